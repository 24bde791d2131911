"""autocompress: find how to compress a Vision Transformer for a measured latency or memory budget.

    import autocompress
    result = autocompress.search("examples/fashion_mnist.yaml", budget="latency=0.5x", trials=40)
    result.pareto            # feasible Pareto front (pandas), with test accuracy
    result.best_policy       # autocompress.Policy
    small = autocompress.apply(model, result.best_policy)
    autocompress.export(result.run_dir, "onnx", "small.onnx")   # or "openvino", "small.xml"
"""

from __future__ import annotations

from typing import Any

from torch import nn

from autocompress.budget import Budget
from autocompress.compose import apply_policy, load_compressed, save_compressed
from autocompress.config import RunConfig, load_config
from autocompress.cost_kinds import Cost
from autocompress.costs import measure_latency, memory_mb, weight_bytes
from autocompress.errors import AutocompressError, InputError, TechniqueError
from autocompress.export import ExportResult, export
from autocompress.hookspecs import hookimpl
from autocompress.metric import Metric
from autocompress.pluginmanager import Plugins, load_plugins
from autocompress.policy import Policy
from autocompress.record import TrialRecord
from autocompress.results import SearchResult

# Imported eagerly on purpose: the function shares its name with the subpackage autocompress.search, and a lazy
# first import of the subpackage would rebind ``autocompress.search`` to the module (it pulls in no Optuna or Ray).
from autocompress.search import search
from autocompress.space import SearchSpace
from autocompress.technique import ApplyContext, Stage, Technique, TechniqueSettings, TrialStopped

__version__ = "0.1.0"

__all__ = [
    "ApplyContext", "AutocompressError", "Budget", "Cost", "ExportResult", "InputError", "Metric", "Plugins", "Policy",
    "RunConfig", "TrialRecord",
    "SearchResult", "SearchSpace", "Stage", "Technique", "TechniqueError", "TechniqueSettings", "TrialStopped", "apply",
    "export", "hookimpl", "load_compressed", "load_config", "load_plugins", "measure_latency", "memory_mb",
    "save_compressed", "search", "weight_bytes",
]


# The subpackage ``autocompress.search`` shares its name with the function below, and Python binds a subpackage to
# its parent's attribute when it is first imported: imported here, before the function is defined, so that
# ``autocompress.search(...)`` stays the function whatever imports ``autocompress.search.*`` later. (The subpackage
# imports Optuna and Ray only when a backend runs.)
import autocompress.search as _search_package  # noqa: E402


def apply(model: nn.Module, policy: Policy | str, plugins: Plugins | None = None,
          ctx: ApplyContext | None = None) -> nn.Module:
    """The compressed copy of ``model`` under ``policy`` (a Policy or a YAML file path)."""
    from autocompress.compose import check_policy

    if not isinstance(policy, Policy):
        policy = Policy.load(policy)
    plugins = plugins or load_plugins()
    check_policy(policy, model, plugins.techniques)
    return apply_policy(model, policy, plugins.techniques, ctx)

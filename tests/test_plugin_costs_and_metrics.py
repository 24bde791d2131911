"""A new budget kind and a new metric, each added from outside the package the way a third party adds them: a cost
(the parameter count) and a metric (top-2 accuracy) registered by plugins, budgeted and chosen by name, in tiny
searches through the command line and the Python API.
"""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml

import autocompress
from autocompress import Cost, Metric, hookimpl
from autocompress.budget import Budget
from autocompress.cli import main
from autocompress.rundir import record_of
from autocompress.config import config_from_dict
from autocompress.errors import InputError
from autocompress.pluginmanager import load_plugins

#: a plugin module as a third party would ship it: one file, one hook
PARAMS_PLUGIN = """
from autocompress import Cost, hookimpl


def parameters(model, run):
    return float(sum(p.numel() for p in model.parameters()))


@hookimpl
def autocompress_register_costs(register):
    register(Cost("params", "params", "parameters", parameters, structural=True))
"""

PRUNING_SPACE = {"techniques": {"pruning": {"layers": [{"match": "re:blocks\\.\\d+", "mlp": [1.0, 0.5, 0.25]}]}}}


def parameters(model, run) -> float:
    return float(sum(p.numel() for p in model.parameters()))


def top2(model, split) -> float:
    """Top-2 accuracy on the first 300 images of ``split`` (deliberately not the builtin)."""
    with torch.inference_mode():
        top = model(split.images[:300]).topk(2, -1).indices
    return float((top == split.labels[:300, None]).any(-1).float().mean())


class Registers:
    """A plugin defined in code: registers the given costs and metrics through the hooks an installed plugin
    implements."""

    def __init__(self, name: str, costs: tuple[Cost, ...] = (), metrics: tuple[Metric, ...] = ()) -> None:
        self.__name__ = name
        self._costs, self._metrics = costs, metrics

    @hookimpl
    def autocompress_register_costs(self, register):
        for cost in self._costs:
            register(cost)

    @hookimpl
    def autocompress_register_metrics(self, register):
        for metric in self._metrics:
            register(metric)


PARAMS = Cost("params", "params", "parameters", parameters, structural=True)
TOP2 = Metric("top2", top2)


@pytest.fixture
def params_plugin_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The params plugin as an installed distribution (its ``.dist-info`` declares the entry point)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "autocompress_params.py").write_text(textwrap.dedent(PARAMS_PLUGIN))
    info = site / "autocompress_params-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: autocompress-params\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[autocompress]\nparams = autocompress_params\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    sys.modules.pop("autocompress_params", None)


# --- the registries ----------------------------------------------------------------------------------------------


def test_hook_autocompress_register_costs() -> None:
    plugins = load_plugins(extra=[Registers("params-plugin", costs=(PARAMS,))])
    assert {"latency", "memory", "params"} <= set(plugins.costs)
    assert plugins.cost_owners["params"] == "params-plugin"
    assert plugins.cost_owners["latency"] == plugins.cost_owners["memory"] == "autocompress", "the core's, same hook"
    info = next(p for p in plugins.info if p.name == "params-plugin")
    assert info.costs == ("params",) and info.error is None
    budget = Budget.parse("latency=0.5x,params=0.25x", costs=plugins.costs)
    assert budget.metrics == ("latency_ms", "params") and budget.also[0].cost is PARAMS
    assert budget.limits({"latency_ms": 10.0, "memory_mb": 1.0, "params": 1000.0}) == {"latency_ms": 5.0, "params": 250.0}
    with pytest.raises(InputError, match="unknown budget 'params'"):
        Budget.parse("params=0.5x")  # without the plugin's registry, only latency and memory are known

    # a taken name or column fails the plugin, naming the plugin that has it, and takes back what it registered
    twice = Cost("latency", "latency_cycles", "cycles", parameters)
    plugins = load_plugins(extra=[Registers("clash", costs=(PARAMS, twice))])
    info = next(p for p in plugins.info if p.name == "clash")
    assert "cost 'latency' is already registered by plugin 'autocompress'" in info.error
    assert "params" not in plugins.costs and plugins.costs["latency"].column == "latency_ms"
    column_taken = Cost("speed", "latency_ms", "ms", parameters)
    info = load_plugins(extra=[Registers("clash2", costs=(column_taken,))]).info[-1]
    assert "cost 'latency_ms' is already registered by plugin 'autocompress'" in info.error
    record_field = Cost("status", "state", "", parameters)
    info = load_plugins(extra=[Registers("clash3", costs=(record_field,))]).info[-1]
    assert "'state' is a field of the trial record" in info.error


def test_hook_autocompress_register_metrics() -> None:
    plugins = load_plugins(extra=[Registers("top2-plugin", metrics=(TOP2,))])
    assert plugins.metrics["top2"] is TOP2 and plugins.metric_owners["top2"] == "top2-plugin"
    assert plugins.metric_owners["accuracy"] == "autocompress"
    assert next(p for p in plugins.info if p.name == "top2-plugin").metrics == ("top2",)
    plugins = load_plugins(extra=[Registers("clash", metrics=(Metric("accuracy", top2),))])
    assert "metric 'accuracy' is already registered by plugin 'autocompress'" in plugins.info[-1].error
    assert plugins.metrics["accuracy"] is autocompress.metric.ACCURACY


# --- searches ----------------------------------------------------------------------------------------------------


def test_a_plugin_cost_is_a_budget_from_the_command_line(tiny_config, tmp_path, params_plugin_installed, capsys):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(PRUNING_SPACE))
    config = {**tiny_config, "space": str(tmp_path / "space.yaml"),
              "search": {"trials": 5, "seed": 0, "strategy": "sample", "finalize_steps": 0}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["search", str(path), "--no-progress", "--budget", "params=0.8x"])
    out = capsys.readouterr().out
    assert code == 0, out
    run = tmp_path / "run"
    base = yaml.safe_load((run / "baseline.yaml").read_text())
    full = parameters(autocompress.models.create_model("vit_tiny_patch16_224", tiny_config["model"]["kwargs"]), None)
    assert base["costs"] == {"params": full}
    limit = 0.8 * full
    trials = pd.read_csv(run / "trials.csv")
    assert {"latency_ms", "memory_mb", "params"} <= set(trials.columns)
    measured = trials[trials["params"].notna() & (trials["state"] == "COMPLETE")]
    assert len(measured) >= 3 and (measured["params"] < full).any()
    for _, row in measured.iterrows():
        assert bool(row["feasible"]) == (row["params"] <= limit), row[["params", "feasible", "skipped"]].to_dict()
        if row["params"] > limit:
            assert row["skipped"] == "params over budget" and math.isnan(row["val_accuracy"])
    pareto = pd.read_csv(run / "pareto.csv")
    assert len(pareto) >= 1 and (pareto["params"] <= limit).all()
    assert f"budget params=0.8x: params <= {limit:.3f}" in out
    study = optuna.load_study(study_name="autocompress", storage=f"sqlite:///{run / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in done:  # the Pareto front's cost axis and the budget constraint are the parameter count
        assert t.values[1] == pytest.approx(record_of(t)["params"])
    page = (run / "report.html").read_text()
    assert "params=0.8x" in page and "params ≤" in page


def test_a_plugin_cost_as_a_further_limit_is_a_constraint(tiny_config, tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(PRUNING_SPACE))
    config = {**tiny_config, "space": str(tmp_path / "space.yaml"), "budget": "memory=0.99x,params=0.8x",
              "search": {"trials": 4, "seed": 0, "strategy": "sample", "finalize_steps": 0}}
    plugins = load_plugins(extra=[Registers("params-plugin", costs=(PARAMS,))])
    result = autocompress.search(config_from_dict(config), plugins=plugins, progress=False, log=lambda _: None)
    limit = 0.8 * result.baseline["costs"]["params"]
    trials = result.trials
    measured = trials[trials["params"].notna() & (trials["state"] == "COMPLETE")]
    assert len(measured) >= 3
    for _, row in measured.iterrows():
        within = row["params"] <= limit and row["memory_mb"] <= 0.99 * result.baseline["memory_mb"]
        assert bool(row["feasible"]) == within
    assert len(result.pareto) >= 1 and (result.pareto["params"] <= limit).all()
    study = optuna.load_study(study_name="autocompress", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all("constraints" in t.system_attrs or "constraints:budget.params" in t.system_attrs for t in done)
    constraints = [t.system_attrs.get("constraints") for t in done if t.system_attrs.get("constraints")]
    if constraints:  # Optuna keeps them as a list in order: budget, budget.params
        assert all(len(c) == 2 for c in constraints)
        for t, c in zip(done, constraints):
            assert c[1] == pytest.approx(record_of(t)["params"] - limit)
    # the report shows the budget although the cost was registered in code by this process alone
    page = (tmp_path / "run" / "report.html").read_text()
    assert "memory=0.99x,params=0.8x" in page


def test_a_plugin_metric_is_chosen_by_name_and_named_in_the_summary_and_report(tiny_config, trained_tiny, tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(PRUNING_SPACE))
    config = {**tiny_config, "space": str(tmp_path / "space.yaml"), "budget": "memory=0.9x",
              "search": {"trials": 4, "seed": 0, "strategy": "sample", "finalize_steps": 0, "metric": "top2"}}
    plugins = load_plugins(extra=[Registers("top2-plugin", metrics=(TOP2,))])
    lines: list[str] = []
    result = autocompress.search(config_from_dict(config), plugins=plugins, progress=False, log=lines.append)
    model, _ = trained_tiny
    saved = yaml.safe_load((tmp_path / "run" / "baseline.yaml").read_text())
    assert saved["metric"] == "top2" and result.score_name == "top2"
    split = _split(config, "val")
    assert result.baseline["val_accuracy"] == pytest.approx(top2(model, split))
    scored = pd.read_csv(tmp_path / "run" / "trials.csv")["val_accuracy"].dropna()
    assert len(scored) >= 1 and all(abs(v * 300 - round(v * 300)) < 1e-3 for v in scored), "top-2 on 300 images"
    summary = "\n".join(lines)
    assert "val top2" in summary and "scored by the metric 'top2'" in summary
    page = (tmp_path / "run" / "report.html").read_text()
    assert result.feasible and "validation top2" in page and "validation accuracy" not in page


def test_an_unknown_metric_is_one_line_naming_the_field(tiny_config, tmp_path, capsys):
    config = {**tiny_config, "search": {**tiny_config["search"], "metric": "top5"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["search", str(path), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert "config.search.metric" in err[0] and "'top5'" in err[0] and "accuracy" in err[0]
    assert not (tmp_path / "run").exists()


def _split(config: dict, name: str):
    from autocompress.runner import load_data

    return getattr(load_data(config_from_dict(config)), name)

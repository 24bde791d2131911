"""``autocompress profile CONFIG``: build (or complete) the latency table of a config's model, space and target."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from torch import nn

from autocompress.config import load_config
from autocompress.errors import InputError
from autocompress.inputs import example_batch, load_data, load_model, space_location
from autocompress.latency_model import build_predictor, describe
from autocompress.models import create_model
from autocompress.pluginmanager import load_plugins
from autocompress.runtime import check_runtime
from autocompress.space import SearchSpace


def profile_command(
    config_path: str, out: str | None = None, force: bool = False, space: str | None = None,
    progress: bool = True, block: Iterable[str] = (),
) -> list[str]:
    """Profile what the config's search space needs; returns the lines to print."""
    config = load_config(config_path)
    if out is not None and Path(out).is_dir():
        raise InputError("--out", f"{out} is a directory; give a file name")
    if space is None:  # the config's own space: a relative path means from the config's folder
        space = space_location(config)
    space_file = SearchSpace.load(space)
    plugins = load_plugins(block=[*config.plugins.get("block", ()), *block])
    runtime = check_runtime(plugins, config.target.runtime, f"{config.source}.target.runtime")
    data = load_data(config)
    model, note = _model(config, data)
    resolved = space_file.resolve(model, plugins.techniques)
    t = config.target
    example = example_batch(data, t.batch_size)
    path = out or (str(config.resolve_path(config.search.latency_table)) if config.search.latency_table else None)
    predictor, stats = build_predictor(
        model, example, resolved, plugins, model_name=config.model.name, model_kwargs=config.model.kwargs,
        threads=t.threads, warmup=t.warmup, repeats=t.repeats, path=path, force=force, progress=progress,
        field="--out" if out else f"{config.source}.search.latency_table", runtime=runtime,
    )
    lines = [f"latency table: {predictor.table.path}",
             f"target: {runtime.name}, {t.threads} threads, batch {t.batch_size}, input {tuple(example.shape[1:])}; "
             f"{stats.summary()}"]
    if note:
        lines.append(note)
    return lines + describe(predictor)


def _model(config, data) -> tuple[nn.Module, str]:
    """The config's model with its checkpoint when there is one; else random weights (timings do not depend on
    weight values), without training it."""
    m = config.model
    if m.checkpoint and config.resolve_path(m.checkpoint).is_file():
        return load_model(config, data), ""
    model = create_model(m.name, m.kwargs, field=f"{config.source}.model")
    return model.eval(), "(no checkpoint yet: profiled with random weights; timings do not depend on weight values)"

"""Before any trial, a latency-budget search times each choice against the uncompressed model and leaves out the
ones this machine makes slower than doing nothing (bf16 on a CPU with AVX2 alone). Tested with a technique made
slow on purpose, so the outcome does not depend on the CPU."""

from __future__ import annotations

import time

import pandas as pd
import yaml
from torch import nn

import autocompress
import autocompress.screening
from autocompress.config import config_from_dict
from autocompress.pluginmanager import load_plugins
from autocompress.technique import ApplyContext, Stage, Technique, TechniqueSettings
from autocompress.testing import TechniquePlugin


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module, sleep_s: float) -> None:
        super().__init__()
        self.inner, self.sleep_s = inner, sleep_s

    def forward(self, x):
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return self.inner(x)


class Sleepy(Technique):
    """On the head: ``slow`` makes every forward sleep 30 ms (several times the tiny model's time); ``wrapped``
    only wraps it (the same speed, another structure, so it is timed and must be kept)."""

    name = "sleepy"
    stage = Stage.STRUCTURE
    layer_knobs = {"mode": "off"}

    def candidate_layers(self, model: nn.Module) -> list[str]:
        return ["head"]

    def check_value(self, model, layer, knob, value) -> None:
        if value not in ("off", "slow", "wrapped"):
            raise ValueError("off, slow or wrapped")

    def apply(self, model: nn.Module, settings: TechniqueSettings, ctx: ApplyContext) -> nn.Module:
        mode = settings.layers.get("head", {}).get("mode", "off")
        if mode != "off":
            model.head = _Wrapped(model.head, 0.03 if mode == "slow" else 0.0)
        return model


def _config(tiny_config: dict, tmp_path, **search) -> dict:
    space = {"techniques": {
        "sleepy": {"layers": [{"match": "head", "mode": ["off", "slow", "wrapped"]}]},
        "pruning": {"layers": [{"match": "re:blocks\\.\\d+", "mlp": [1.0, 0.5]}]},
    }}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    return {**tiny_config, "space": str(tmp_path / "space.yaml"), "budget": "latency=0.9x",
            "search": {"trials": 5, "sampler": "random", "seed": 0, "strategy": "sample", **search}}


def test_a_choice_slower_than_doing_nothing_is_left_out_and_said(tiny_config, tmp_path, monkeypatch):
    logs: list[str] = []
    plugins = load_plugins(extra=[TechniquePlugin("sleepy-test-plugin", Sleepy())])
    result = autocompress.search(config_from_dict(_config(tiny_config, tmp_path)), plugins=plugins, progress=False,
                                 log=logs.append)
    said = [line for line in logs if line.startswith("sleepy.mode=slow: ")]
    assert len(said) == 1 and "left out of the search" in said[0] and "keep_slow_choices" in said[0], logs
    assert not any(line.startswith(("sleepy.mode=wrapped", "pruning.")) for line in logs), logs
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert set(trials["head:sleepy.mode"]) <= {"off", "wrapped"}
    assert "uniform sleepy.mode=wrapped" in set(trials["baseline"])
    saved = yaml.safe_load((tmp_path / "run" / "baseline.yaml").read_text())
    assert list(saved["slow_choices"]) == ["sleepy.mode=slow"] and saved["slow_choices"]["sleepy.mode=slow"] > 1.5
    assert len(result.trials) == 5

    # resumed: the same space, from the saved baseline, timed no more
    def no_timing(*args, **kwargs):
        raise AssertionError("a resumed run timed the choices again")

    monkeypatch.setattr(autocompress.runner, "measure_slow_choices", no_timing)
    autocompress.search(config_from_dict(_config(tiny_config, tmp_path)), trials=7, resume=True, plugins=plugins,
                        progress=False, log=logs.append)
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert len(trials) == 7 and set(trials["head:sleepy.mode"]) <= {"off", "wrapped"}


def test_keep_slow_choices_keeps_them_and_a_memory_budget_times_nothing(tiny_config, tmp_path, monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("timed the choices")

    monkeypatch.setattr(autocompress.runner, "measure_slow_choices", no_timing)
    plugins = load_plugins(extra=[TechniquePlugin("sleepy-test-plugin", Sleepy())])
    config = _config(tiny_config, tmp_path, keep_slow_choices=True, trials=6)
    autocompress.search(config_from_dict(config), plugins=plugins, progress=False)
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert "uniform sleepy.mode=slow" in set(trials["baseline"])
    memory = {**_config(tiny_config, tmp_path, trials=2), "budget": "memory=0.9x", "out": str(tmp_path / "mem")}
    autocompress.search(config_from_dict(memory), plugins=plugins, progress=False)

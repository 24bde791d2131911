"""One test per hook in autocompress/hookspecs.py (named test_hook_<hook>; tests/test_hooks_documented.py checks)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

import autocompress
from autocompress.data import Dataset
from autocompress.pluginmanager import PluginWarning, load_plugins
from autocompress.technique import Stage, Technique

from conftest import make_tiny_vit


class _Noop(Technique):
    name = "noop_for_hook_test"
    stage = Stage.RECOVERY
    layer_knobs = {"keep": True}

    def candidate_layers(self, model):
        return ["head"]

    def apply(self, model, settings, ctx):
        return model


def test_hook_autocompress_register_techniques() -> None:
    class Registers:
        __name__ = "registers_two"

        @autocompress.hookimpl
        def autocompress_register_techniques(self, register):
            register(_Noop())

    plugins = load_plugins(extra=[Registers()])
    assert isinstance(plugins.techniques["noop_for_hook_test"], _Noop)
    assert plugins.owners["noop_for_hook_test"] == "registers_two"
    info = {p.name: p for p in plugins.info}["registers_two"]
    assert info.techniques == ("noop_for_hook_test",) and info.error is None
    order = [t.name for t in plugins.ordered()]
    assert order.index("noop_for_hook_test") < order.index("quantization"), "RECOVERY runs before FORMAT"


def test_hook_autocompress_trial_completed(tmp_path, fmnist: Dataset) -> None:
    seen: list[dict] = []

    class Recorder:
        __name__ = "recorder"

        @autocompress.hookimpl
        def autocompress_trial_completed(self, record):
            seen.append(record)
            record["number"] = -1  # a listener gets a copy: this must not reach trials.csv

    class Crashes:
        __name__ = "crashes"

        @autocompress.hookimpl
        def autocompress_trial_completed(self, record):
            raise RuntimeError("listener bug")

    space = {"techniques": {"quantization": {"layers": [{"match": "re:blocks\\.\\d+\\.mlp\\.fc1",
                                                         "format": ["fp32", "bf16"]}]}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    config = {"target": {"threads": 2, "batch_size": 32, "warmup": 1, "repeats": 3}, "budget": "latency=1.0x",
              "space": str(tmp_path / "space.yaml"), "out": str(tmp_path / "run"),
              "search": {"trials": 3, "seed": 0, "keep_slow_choices": True}}  # bf16 stays where it is slow (AVX2)
    data = Dataset(fmnist.train.head(128), fmnist.val.head(200), fmnist.test.head(200), fmnist.classes)
    plugins = load_plugins(extra=[Recorder(), Crashes()])
    with pytest.warns(PluginWarning, match="plugin 'crashes' failed in autocompress_trial_completed: RuntimeError: "
                                           "listener bug"):
        autocompress.search(config, model=make_tiny_vit(), data=data, plugins=plugins, progress=False,
                            log=lambda line: None)

    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert sorted(r["number"] for r in seen) == [-1, -1, -1] and len(seen) == len(trials) == 3
    assert sorted(trials["number"]) == [0, 1, 2]
    for key in ("state", "feasible", "val_accuracy", "latency_ms", "memory_mb", "error", "policy"):
        assert all(key in r for r in seen), key
    assert all(r["state"] == "COMPLETE" for r in seen), [r["error"] for r in seen]
    assert len(plugins.hook_errors) == 3, "the crashing listener is reported each time, and the recorder still hears"

"""Runtimes as plugins: a search times every candidate in the config's ``target.runtime``, paired with the
uncompressed model prepared the same way; choices the runtime cannot run are left out; the Pareto front is re-timed
there at the end with each member's torch-eager time beside it.

The mechanism is tested with a runtime of the test's own, made slow on purpose for one kind of model, so the outcome
does not depend on the CPU; ONNX Runtime and OpenVINO are tested on what they run and on a tiny search each."""

from __future__ import annotations

import importlib.util
import json
import time

import pandas as pd
import pytest
import torch
import yaml

import autocompress
from autocompress.compose import apply_policy
from autocompress.config import config_from_dict
from autocompress.errors import InputError
from autocompress.pluginmanager import load_plugins
from autocompress.policy import Policy
from autocompress.runtime import TORCH, Runtime, check_runtime
from autocompress.screening import unsupported_choices
from autocompress.technique import ApplyContext

from conftest import make_tiny_vit


class SlowInt8(Runtime):
    """torch eager, but a model with any quantized Linear sleeps 30 ms per call (several times the tiny model's
    time), each MLP hidden unit costs 40 us more (so pruning the MLPs pays by a margin no CPU's noise closes: on an
    AVX-512 CPU the tiny model's MLPs are too small for pruning alone to reach a 0.9x budget), and every prepared
    model is counted."""

    name = "slow-int8"
    label = "torch, int8 made slow"

    def __init__(self) -> None:
        self.prepared = 0

    def prepare(self, model, example, threads, plugins):
        self.prepared += 1
        quantized = any(type(m).__name__ == "DynamicInt8Linear" for m in model.modules())
        hidden = sum(m.fc1.out_features for m in model.modules() if isinstance(getattr(m, "fc1", None), torch.nn.Linear))
        model.eval()

        def run():
            time.sleep(0.03 * quantized + 40e-6 * hidden)
            return model(example)

        return run


PLUGIN = "slow-int8-runtime-plugin"


class RuntimePlugin:
    """A third-party plugin defined in code, registering one runtime through the hook."""

    __name__ = PLUGIN

    def __init__(self, *runtimes: Runtime) -> None:
        self.runtimes = runtimes

    def autocompress_register_runtimes(self, register):
        for runtime in self.runtimes:
            register(runtime)


def _int8_space(tmp_path, formats=("fp32", "int8_dynamic")) -> str:
    space = {"techniques": {
        "quantization": {"layers": [{"match": "re:blocks\\.\\d+\\.mlp\\.fc\\d", "format": list(formats)}]},
        "pruning": {"layers": [{"match": "re:blocks\\.\\d+", "mlp": [1.0, 0.5]}]},
    }}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def test_hook_autocompress_register_runtimes(tiny_config, tmp_path):
    """A runtime from outside the package times the search: the baseline, the screening and every measured trial
    go through its prepare, and what it makes slow is left out of the search as slow *in that runtime*."""
    runtime = SlowInt8()
    plugins = load_plugins(extra=[RuntimePlugin(runtime)])
    assert plugins.runtimes["slow-int8"] is runtime and plugins.runtime_owners["slow-int8"] == PLUGIN
    assert "slow-int8" in next(p for p in plugins.info if p.name == PLUGIN).runtimes
    config = {**tiny_config, "space": _int8_space(tmp_path), "target": {**tiny_config["target"], "runtime": "slow-int8"}}
    logs: list[str] = []
    result = autocompress.search(config_from_dict(config), plugins=plugins, progress=False, log=logs.append)
    base = yaml.safe_load((tmp_path / "run" / "baseline.yaml").read_text())
    assert base["runtime"] == "slow-int8"
    assert "quantization.format=int8_dynamic" in base["slow_choices"], base
    assert any("quantization.format=int8_dynamic" in line and "in slow-int8" in line and "left out" in line
               for line in logs), logs
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert "blocks.0.mlp.fc1:quantization.format" not in trials.columns or \
        set(trials["blocks.0.mlp.fc1:quantization.format"].dropna()) <= {"fp32"}
    measured = int(trials["latency_ms"].notna().sum())
    # baseline (reference + 3 medians share one prepare) + screening (reference + pruning) + every measured trial
    assert runtime.prepared >= 1 + 2 + measured, (runtime.prepared, measured)
    assert not result.pareto.empty
    assert set(result.pareto["runtime"]) == {"slow-int8"}
    assert result.pareto["latency_ms_final"].notna().all() and result.pareto["latency_ms_torch"].notna().all()


class SlowPerInt8(Runtime):
    """torch eager, but each int8 Linear costs one more forward pass of the model: costs that add up layer by layer,
    as the table's deltas assume, far above timing noise, and slowed by machine load as the model itself is (a
    sleep would not be, and its ratio to the model would drift with the load)."""

    name = "slow-per-int8"

    def prepare(self, model, example, threads, plugins):
        n = sum(type(m).__name__ == "DynamicInt8Linear" for m in model.modules())
        model.eval()

        def run():
            for _ in range(n):
                model(example)
            return model(example)

        return run


def test_a_table_timed_in_a_runtime_holds_whole_model_deltas_that_add_up(tmp_path, plugins, fmnist):
    from autocompress.costs import paired_ratio
    from autocompress.latency_model import build_predictor

    torch.manual_seed(0)
    model = make_tiny_vit().eval()
    example = fmnist.val.images[:32]
    space = autocompress.SearchSpace.load(_int8_space(tmp_path)).resolve(model, plugins.techniques)
    runtime = SlowPerInt8()
    predictor, stats = build_predictor(model, example, space, plugins, model_name="tiny", model_kwargs={}, threads=1,
                                       warmup=1, repeats=5, path=tmp_path / "table.json", runtime=runtime)
    table = predictor.table
    assert table.key["runtime"].startswith("slow-per-int8") and stats.end_to_end == stats.measured - 1 > 0
    fc1 = table.entry("blocks.0.mlp.fc1", 'blocks.0.mlp.fc1:quantization.format="int8_dynamic"')
    assert fc1["how"] == "end to end in slow-per-int8"
    assert fc1["delta"] == pytest.approx(1.0, rel=0.25), fc1  # one more pass of the model per int8 layer
    assert table.entry("blocks.1.mlp.fc1", 'blocks.1.mlp.fc1:quantization.format="int8_dynamic"')["how"] == \
        "mirrored from blocks.0.mlp.fc1"
    reference = runtime.prepare(model, example, 1, plugins)
    for params in ({"blocks.0.mlp.fc1:quantization.format": "int8_dynamic"},
                   {"blocks.0.mlp.fc1:quantization.format": "int8_dynamic", "blocks.1.mlp.fc2:quantization.format":
                    "int8_dynamic", "blocks.1:pruning.mlp": 0.5},
                   {f"blocks.{b}.mlp.fc{i}:quantization.format": "int8_dynamic" for b in (0, 1) for i in (1, 2)}):
        realised = apply_policy(model, space.policy(params), plugins.techniques, ApplyContext(structure_only=True))
        measured = paired_ratio(reference, runtime.prepare(realised, example, 1, plugins), example, 1, 1, 5).median_ms
        predicted = predictor.predict(params) / table.base_ms
        assert predicted == pytest.approx(measured, rel=0.2), (params, predicted, measured)


def test_a_runtime_name_taken_twice_fails_that_plugin_alone():
    class Again(SlowInt8):
        name = "torch"

    plugins = load_plugins(extra=[RuntimePlugin(Again())])
    info = next(p for p in plugins.info if p.name == PLUGIN)
    assert info.error and "already registered by plugin 'autocompress'" in info.error, info
    assert plugins.runtimes["torch"] is TORCH


def test_unknown_or_missing_runtime_is_one_line_naming_the_field(plugins):
    with pytest.raises(InputError) as err:
        check_runtime(plugins, "tensorrt")
    assert err.value.field == "target.runtime" and "unknown runtime 'tensorrt'" in str(err.value)
    assert "onnxruntime" in str(err.value) and "torch" in str(err.value)

    class Absent(Runtime):
        name = "absent"
        modules = ("no_such_module_for_autocompress",)
        extra = "absent"

    with pytest.raises(InputError) as err:
        check_runtime(load_plugins(extra=[RuntimePlugin(Absent())]), "absent")
    assert "pip install 'autocompress[absent]'" in str(err.value) and "\n" not in str(err.value)


def test_a_config_asking_for_an_unknown_runtime_stops_before_any_trial(tiny_config, tmp_path):
    config = {**tiny_config, "target": {**tiny_config["target"], "runtime": "nope"}}
    with pytest.raises(InputError) as err:
        autocompress.search(config_from_dict(config), progress=False, log=lambda s: None)
    assert err.value.field.endswith("target.runtime")
    assert not (tmp_path / "run" / "trials.csv").exists()


# --- the builtin runtimes -----------------------------------------------------------------------------------------

needs_both = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "openvino")),
    reason="needs autocompress[onnx,openvino]")


@needs_both
@pytest.mark.speed
def test_two_onnxruntime_sessions_of_one_model_time_alike_in_turns(plugins):
    """Every latency in ONNX Runtime is a ratio of two sessions timed in turns, so two sessions of the same model
    must time alike. With ORT's default spinning threads they did not (demo ViT, batch 256, Xeon with AMX): each
    newer session measured 0.76-0.94x the one before it, since the idle session's threads kept spinning on the
    cores, and the runtime's latency table summed that bias into a policy predicted at 0.25x that measured 0.77x."""
    from autocompress.costs import paired_ratio

    runtime = check_runtime(plugins, "onnxruntime")
    torch.manual_seed(0)
    model = make_tiny_vit(embed_dim=96, num_heads=3, depth=6).eval()
    example = torch.randn(256, 1, 28, 28)
    sessions = [runtime.prepare(model, example, 2, plugins) for _ in range(3)]
    ratios = [paired_ratio(sessions[i - 1], sessions[i], example, 2, warmup=1, repeats=10).median_ms for i in (1, 2)]
    assert all(0.9 <= r <= 1.1 for r in ratios), ratios


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_builtin_runtime_runs_the_model_as_torch_does_and_refuses_bf16(name, plugins, fmnist):
    runtime = check_runtime(plugins, name)
    torch.manual_seed(0)
    model = make_tiny_vit().eval()
    example = fmnist.val.images[:16]
    out = runtime.prepare(model, example, 1, plugins)()
    with torch.inference_mode():
        ref = model(example)
    got = torch.as_tensor(out[0] if isinstance(out, (list, tuple)) else next(iter(out.values())))
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4 * float(ref.abs().max())), name

    int8 = apply_policy(model, Policy.from_params({"blocks.0.mlp.fc1:quantization.format": "int8_dynamic"}),
                        plugins.techniques, ApplyContext(structure_only=True))
    runtime.prepare(int8, example, 1, plugins)()  # runs (QDQ int8)

    space = autocompress.SearchSpace.load("vit").resolve(model, plugins.techniques)
    refused = unsupported_choices(model, space, plugins.techniques, example, runtime, plugins, 1)
    assert "quantization.format=bf16" in refused and "bf16" in refused["quantization.format=bf16"], refused
    assert "quantization.format=int8_dynamic" not in refused


@needs_both
@pytest.mark.slow
@pytest.mark.parametrize("name,strategy", [("onnxruntime", "sample"), ("openvino", "solve")])
def test_a_search_in_a_builtin_runtime_runs_end_to_end(name, strategy, tiny_config, tmp_path):
    search = {**tiny_config["search"], "trials": 3, "strategy": strategy, "solver_waves": 0, "finalize_steps": 0,
              "latency_table": str(tmp_path / "table.json")}
    config = {**tiny_config, "search": search, "target": {**tiny_config["target"], "threads": 1, "runtime": name},
              "space": _int8_space(tmp_path, ("fp32", "int8_dynamic", "bf16")), "budget": "latency=0.95x"}
    logs: list[str] = []
    result = autocompress.search(config_from_dict(config), progress=False, log=logs.append)
    base = yaml.safe_load((tmp_path / "run" / "baseline.yaml").read_text())
    assert base["runtime"] == name and "quantization.format=bf16" in base["unsupported"]
    assert any("quantization.format=bf16" in line and f"{name} cannot run it" in line for line in logs), logs
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert len(trials) == 3 and trials["latency_ms"].notna().any()
    assert not trials.isin(["bf16"]).any().any()  # never drawn (int8 may be left out too: slower there)
    if not result.pareto.empty:
        pareto = pd.read_csv(tmp_path / "run" / "pareto.csv")
        assert set(pareto["runtime"]) == {name} and pareto["latency_ms_torch"].notna().any()
        page = (tmp_path / "run" / "report.html").read_text()
        assert f"measured in {name} at batch" in page and "torch eager ms" in page
    assert any(f"latency measured in {name}" in line for line in logs), logs
    if strategy == "solve":  # the table the solver costs options by was timed in that runtime
        table = json.loads((tmp_path / "table.json").read_text())
        assert table["key"]["runtime"].startswith(name)
        hows = {e.get("how") for entries in table["entries"].values() for k, e in entries.items() if k}
        assert f"end to end in {name}" in hows, hows

"""Bad input through the real command line: one line naming the field or file, exit status 2, no traceback, and no
run directory written (or the existing one left exactly as it was).

Every case goes through ``autocompress.cli.main([...])``. Most fail before any model work; the ones that need a model
(space resolution, checkpoints, policies) use the tiny ViT of ``tests/conftest.py`` on a small IDX copy of the real
Fashion-MNIST files, so the whole battery stays fast.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from autocompress.cli import main

from conftest import make_tiny_vit

from reliability_support import N_TRAIN, cfg, small_fmnist, write_yaml  # noqa: F401 (fixtures)


# --- helpers --------------------------------------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *names: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("autocompress: error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def snapshot(folder: Path) -> dict[str, str] | None:
    """Every file under ``folder`` with a hash of its content (None: the folder does not exist)."""
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mtime_ns}"
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def search_fails(capsys, tmp_path: Path, config: dict, *extra: str, names: tuple[str, ...] = ()) -> str:
    """Run ``autocompress search`` on ``config``; assert the one-line error and that no run directory appeared."""
    path = write_yaml(tmp_path / "config.yaml", config)
    run_dir = Path(config["out"])
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "search", path, "--no-progress", *extra)
    line = assert_one_line_error(code, err, *names)
    assert snapshot(run_dir) == before, "the run directory was created or changed"
    return line


# --- the config file --------------------------------------------------------------------------------------------------


def test_malformed_yaml_config(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: [vit_tiny_patch16_224\nbudget: latency=0.5x\n")
    line = assert_one_line_error(*run_cli(capsys, "search", path), str(path))
    assert "line" in line


def test_config_that_is_not_a_mapping(capsys, tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- data\n")
    assert_one_line_error(*run_cli(capsys, "search", path), str(path), "mapping")


def test_config_that_is_a_binary_file(capsys, tmp_path):
    path = tmp_path / "weights.yaml"
    torch.save({"w": torch.randn(64)}, path)
    assert_one_line_error(*run_cli(capsys, "search", path), str(path))


def test_missing_config_file(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "search", tmp_path / "nope.yaml"), "nope.yaml")


def test_unknown_top_level_config_key(capsys, tmp_path, cfg):
    cfg["modle"] = cfg.pop("model")
    search_fails(capsys, tmp_path, cfg, names=("config.modle", "unknown key"))


def test_unknown_key_inside_a_config_section(capsys, tmp_path, cfg):
    cfg["model"]["chekpoint"] = cfg["model"].pop("checkpoint")
    search_fails(capsys, tmp_path, cfg, names=("config.model.chekpoint", "unknown key"))


def test_config_value_of_the_wrong_type(capsys, tmp_path, cfg):
    cfg["search"]["trials"] = "ten"
    search_fails(capsys, tmp_path, cfg, names=("config.search.trials", "integer"))


def test_zero_trials(capsys, tmp_path, cfg):
    search_fails(capsys, tmp_path, cfg, "--trials", "0", names=("search.trials",))


def test_negative_trial_timeout(capsys, tmp_path, cfg):
    cfg["search"]["trial_timeout_s"] = -1
    search_fails(capsys, tmp_path, cfg, names=("config.search.trial_timeout_s",))


@pytest.mark.parametrize("key, value, words", [("sensitivity", "hessian", "unknown method"),
                                             ("sensitivity_seconds", 0, "above 0")],
                         ids=["sensitivity-method", "sensitivity-seconds"])
def test_bad_sensitivity_settings(capsys, tmp_path, cfg, key, value, words):
    cfg["search"][key] = value
    search_fails(capsys, tmp_path, cfg, names=(f"config.search.{key}", words))


def test_unknown_timm_model(capsys, tmp_path, cfg):
    cfg["model"]["name"] = "vit_tinny_patch16_224"
    search_fails(capsys, tmp_path, cfg, names=("config.model.name", "vit_tinny_patch16_224"))


def test_model_kwargs_the_architecture_does_not_take(capsys, tmp_path, cfg):
    cfg["model"]["kwargs"]["embed_dimm"] = 64
    search_fails(capsys, tmp_path, cfg, names=("config.model.kwargs", "embed_dimm"))


def test_yaml_python_tag_is_refused_by_the_safe_loader(capsys, tmp_path, cfg):
    marker = tmp_path / "pwned"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg) + f"extra: !!python/object/apply:os.system ['touch {marker}']\n")
    assert_one_line_error(*run_cli(capsys, "search", path), str(path))
    assert not marker.exists()


def test_config_cannot_name_a_module_to_import(capsys, tmp_path, cfg):
    cfg["plugins"] = {"load": ["os"]}
    search_fails(capsys, tmp_path, cfg, names=("config.plugins",))


def test_unknown_search_backend(capsys, tmp_path, cfg):
    cfg["search"]["backend"] = "os:system"
    search_fails(capsys, tmp_path, cfg, names=("search.backend", "os:system"))


def test_unknown_runtime(capsys, tmp_path, cfg):
    cfg["target"]["runtime"] = "tensorrt"
    search_fails(capsys, tmp_path, cfg, names=("target.runtime", "tensorrt", "onnxruntime"))


def test_runtime_not_installed(capsys, tmp_path, cfg, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name, *a))
    cfg["target"]["runtime"] = "openvino"
    search_fails(capsys, tmp_path, cfg, names=("target.runtime", "openvino", "pip install 'autocompress[openvino]'"))


# --- budgets ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget, words",
    [
        ("latency_ms=-5", "cannot read"),
        ("latency_ms=0", "positive"),
        ("memory_mb=0", "positive"),
        ("latency=2x", "above 1x"),
        ("latency=0.5", "fraction"),
        ("memory_mb=5x", "absolute"),
        ("energy=3", "unknown budget"),
        ("as fast as possible", "cannot read"),
        ("", "cannot read"),
    ],
    ids=["negative", "zero-latency", "zero-memory", "relative-above-1x", "relative-without-x", "absolute-with-x",
         "unknown-kind", "garbage", "empty"],
)
def test_bad_budget_on_the_command_line(capsys, tmp_path, cfg, budget, words):
    search_fails(capsys, tmp_path, cfg, "--budget", budget, names=("budget", words))


def test_budget_of_the_wrong_type_in_the_config(capsys, tmp_path, cfg):
    cfg["budget"] = 0.5
    search_fails(capsys, tmp_path, cfg, names=("config.budget", "string"))


# --- search spaces ----------------------------------------------------------------------------------------------------

VIT_LINEARS = "re:blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.(fc1|fc2))"


def space_fails(capsys, tmp_path, cfg, space: object, *names: str) -> str:
    path = tmp_path / "space.yaml"
    if isinstance(space, str):
        path.write_text(space)
    else:
        write_yaml(path, space)
    return search_fails(capsys, tmp_path, cfg, "--space", path, names=(str(path), *names))


def test_unknown_space_name(capsys, tmp_path, cfg):
    search_fails(capsys, tmp_path, cfg, "--space", "vit_galactic", names=("space", "vit_galactic"))


def test_malformed_yaml_space(capsys, tmp_path, cfg):
    space_fails(capsys, tmp_path, cfg, "techniques:\n  quantization: {layers: [\n", "not valid YAML")


def test_unknown_key_in_space(capsys, tmp_path, cfg):
    space_fails(capsys, tmp_path, cfg, {"techniques": {"quantization": {"layer": []}}}, "quantization.layer")


def test_unknown_technique_in_space(capsys, tmp_path, cfg):
    space = {"techniques": {"quantisation": {"layers": [{"match": VIT_LINEARS, "format": ["bf16"]}]}}}
    space_fails(capsys, tmp_path, cfg, space, "techniques.quantisation", "unknown technique")


def test_space_pattern_that_matches_no_layer(capsys, tmp_path, cfg):
    space = {"techniques": {"quantization": {"layers": [{"match": "blocks.*.attn.qkvv", "format": ["bf16"]}]}}}
    space_fails(capsys, tmp_path, cfg, space, "layers[0].match", "blocks.*.attn.qkvv", "matches no layer")


def test_space_choice_the_technique_cannot_apply(capsys, tmp_path, cfg):
    space = {"techniques": {"quantization": {"layers": [{"match": VIT_LINEARS, "format": ["bf16", "fp13"]}]}}}
    space_fails(capsys, tmp_path, cfg, space, "layers[0].format", "fp13")


def test_space_knob_the_technique_does_not_have(capsys, tmp_path, cfg):
    space = {"techniques": {"quantization": {"layers": [{"match": VIT_LINEARS, "bits": [4, 8]}]}}}
    space_fails(capsys, tmp_path, cfg, space, "layers[0].bits", "unknown knob")


# --- checkpoints ------------------------------------------------------------------------------------------------------


def checkpoint_fails(capsys, tmp_path, cfg, checkpoint: Path, *names: str) -> str:
    cfg["model"]["checkpoint"] = str(checkpoint)
    return search_fails(capsys, tmp_path, cfg, names=("config.model.checkpoint", str(checkpoint), *names))


def test_missing_checkpoint(capsys, tmp_path, cfg):
    checkpoint_fails(capsys, tmp_path, cfg, tmp_path / "absent.pt", "not found")


def test_truncated_checkpoint(capsys, tmp_path, cfg):
    good = Path(cfg["model"]["checkpoint"]).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: len(good) // 2])
    checkpoint_fails(capsys, tmp_path, cfg, cut, "cannot read")


def test_checkpoint_of_another_architecture(capsys, tmp_path, cfg):
    other = tmp_path / "wider.pt"
    torch.save({"state_dict": make_tiny_vit(embed_dim=64).state_dict()}, other)
    checkpoint_fails(capsys, tmp_path, cfg, other, "does not fit")


def test_checkpoint_that_is_not_a_state_dict(capsys, tmp_path, cfg):
    odd = tmp_path / "list.pt"
    torch.save([torch.zeros(3), torch.ones(2)], odd)
    checkpoint_fails(capsys, tmp_path, cfg, odd, "state dict")


def test_corrupt_safetensors_checkpoint(capsys, tmp_path, cfg):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    checkpoint_fails(capsys, tmp_path, cfg, bad, "cannot read")


class _RunsCode:
    """Pickles to a call of ``os.system``: what a malicious checkpoint carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickle_checkpoint_carrying_code_is_refused(capsys, tmp_path, cfg):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    state = make_tiny_vit().state_dict()
    torch.save({"state_dict": state, "hook": _RunsCode(f"touch {marker}")}, evil)
    line = checkpoint_fails(capsys, tmp_path, cfg, evil, "refused", "system")
    assert "weights_only=False" not in line  # never advise running the code
    assert not marker.exists()


def test_compressed_model_carrying_code_is_refused(tmp_path, plugins):
    from autocompress import InputError, load_compressed

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_compressed.pt"
    torch.save({"format": "autocompress.compressed/1", "hook": _RunsCode(f"touch {marker}")}, evil)
    with pytest.raises(InputError) as info:
        load_compressed(evil, plugins.techniques)
    assert str(evil) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


# --- data sets --------------------------------------------------------------------------------------------------------


def copy_data(small_fmnist: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(small_fmnist, folder)
    return folder


def test_missing_dataset_folder(capsys, tmp_path, cfg):
    cfg["data"]["path"] = str(tmp_path / "no-such-data")
    search_fails(capsys, tmp_path, cfg, names=("config.data.path", "no-such-data"))


def test_dataset_folder_without_one_file(capsys, tmp_path, cfg, small_fmnist):
    folder = copy_data(small_fmnist, tmp_path)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    cfg["data"]["path"] = str(folder)
    search_fails(capsys, tmp_path, cfg, names=("config.data.path", "t10k-labels-idx1-ubyte"))


def test_truncated_idx_file(capsys, tmp_path, cfg, small_fmnist):
    folder = copy_data(small_fmnist, tmp_path)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:50_000])
    cfg["data"]["path"] = str(folder)
    search_fails(capsys, tmp_path, cfg, names=("config.data.path", str(images), "corrupt"))


def test_idx_file_with_the_wrong_magic(capsys, tmp_path, cfg, small_fmnist):
    folder = copy_data(small_fmnist, tmp_path)
    labels = folder / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\x50\x4b\x03\x04" + labels.read_bytes()[4:])
    cfg["data"]["path"] = str(folder)
    search_fails(capsys, tmp_path, cfg, names=("config.data.path", str(labels), "magic"))


def test_gzipped_idx_file_that_is_cut_short(capsys, tmp_path, cfg, small_fmnist):
    folder = copy_data(small_fmnist, tmp_path)
    images = folder / "t10k-images-idx3-ubyte"
    packed = gzip.compress(images.read_bytes())
    images.unlink()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(packed[: len(packed) // 3])
    cfg["data"]["path"] = str(folder)
    search_fails(capsys, tmp_path, cfg, names=("config.data.path", "t10k-images-idx3-ubyte.gz"))


def test_validation_split_larger_than_the_data(capsys, tmp_path, cfg):
    cfg["data"]["val_size"] = N_TRAIN + 1
    search_fails(capsys, tmp_path, cfg, names=("data.val_size",))


# --- the run directory ------------------------------------------------------------------------------------------------


def test_output_below_a_file(capsys, tmp_path, cfg):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    cfg["out"] = str(blocker / "run")
    search_fails(capsys, tmp_path, cfg, names=("out", str(blocker)))
    assert blocker.read_text() == "not a folder\n"


def test_output_where_nothing_can_be_written(capsys, tmp_path, cfg):
    cfg["out"] = "/proc/autocompress-test-run"  # not writable, even for root
    search_fails(capsys, tmp_path, cfg, names=("out", "cannot write"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_output_in_a_read_only_folder(capsys, tmp_path, cfg):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cfg["out"] = str(locked / "run")
    try:
        search_fails(capsys, tmp_path, cfg, names=("out", str(locked)))
    finally:
        locked.chmod(0o700)


def fake_finished_run(cfg: dict) -> Path:
    """A run directory as a finished search leaves it (enough of it to resume from)."""
    from autocompress.config import config_from_dict

    run_dir = Path(cfg["out"])
    run_dir.mkdir(parents=True)
    write_yaml(run_dir / "config.yaml", config_from_dict(cfg).to_dict())
    write_yaml(run_dir / "baseline.yaml", {"latency_ms": 5.0, "memory_mb": 0.2, "val_accuracy": 0.7})
    (run_dir / "trials.csv").write_text("number,state\n0,COMPLETE\n")
    return run_dir


def test_output_that_already_holds_a_run(capsys, tmp_path, cfg):
    fake_finished_run(cfg)
    search_fails(capsys, tmp_path, cfg, names=("out", "already holds a run", "--resume"))


def test_resume_with_nothing_to_resume(capsys, tmp_path, cfg):
    search_fails(capsys, tmp_path, cfg, "--resume", names=("out", "nothing to resume"))


def test_resume_with_another_budget(capsys, tmp_path, cfg):
    fake_finished_run(cfg)
    search_fails(capsys, tmp_path, cfg, "--resume", "--budget", "memory=0.5x",
                 names=("config.budget", "differs from the run being resumed"))


def test_resume_with_another_model(capsys, tmp_path, cfg):
    fake_finished_run(cfg)
    cfg["model"]["kwargs"]["depth"] = 3
    search_fails(capsys, tmp_path, cfg, "--resume", names=("config.model", "differs from the run being resumed"))


def test_resume_with_a_corrupt_saved_baseline(capsys, tmp_path, cfg):
    run_dir = fake_finished_run(cfg)
    (run_dir / "baseline.yaml").write_text("latency_ms: [\n")
    search_fails(capsys, tmp_path, cfg, "--resume", names=(str(run_dir / "baseline.yaml"),))


# --- policies (autocompress apply) ------------------------------------------------------------------------------------


def apply_fails(capsys, tmp_path, cfg, policy: object, *names: str) -> str:
    config = write_yaml(tmp_path / "config.yaml", cfg)
    path = tmp_path / "policy.yaml"
    if isinstance(policy, str):
        path.write_text(policy)
    else:
        write_yaml(path, policy)
    out = tmp_path / "small.pt"
    code, err = run_cli(capsys, "apply", path, "--config", config, "--out", out, "--no-measure")
    line = assert_one_line_error(code, err, *names)
    assert not out.exists()
    return line


def quant_policy(layers: dict, model: str = "vit_tiny_patch16_224") -> dict:
    return {"model": model, "techniques": {"quantization": {"layers": layers}}}


def test_policy_for_layers_this_model_does_not_have(capsys, tmp_path, cfg):
    policy = quant_policy({"blocks.0.attn.qkv": {"format": "bf16"}, "blocks.7.mlp.fc1": {"format": "bf16"}})
    apply_fails(capsys, tmp_path, cfg, policy, "policy.yaml.techniques.quantization.layers.blocks.7.mlp.fc1",
                "no such layer")


def test_policy_made_for_another_model(capsys, tmp_path, cfg):
    policy = quant_policy({"blocks.0.attn.qkv": {"format": "bf16"}}, model="deit_small_patch16_224")
    apply_fails(capsys, tmp_path, cfg, policy, "policy.yaml.model", "deit_small_patch16_224")


def test_policy_with_an_unknown_key(capsys, tmp_path, cfg):
    policy = quant_policy({"blocks.0.attn.qkv": {"format": "bf16"}})
    policy["technique"] = policy.pop("techniques")
    apply_fails(capsys, tmp_path, cfg, policy, "policy.yaml.technique", "unknown key")


def test_policy_with_a_technique_that_is_not_installed(capsys, tmp_path, cfg):
    policy = {"model": "vit_tiny_patch16_224", "techniques": {"sparsify": {"layers": {"head": {"ratio": 0.5}}}}}
    apply_fails(capsys, tmp_path, cfg, policy, "policy.yaml.techniques.sparsify", "not installed")


def test_policy_with_a_value_the_technique_cannot_apply(capsys, tmp_path, cfg):
    policy = quant_policy({"blocks.0.attn.qkv": {"format": "int1_weight"}})
    apply_fails(capsys, tmp_path, cfg, policy, "layers.blocks.0.attn.qkv.format", "int1_weight")


def test_policy_yaml_python_tag_is_refused(capsys, tmp_path, cfg):
    marker = tmp_path / "pwned"
    apply_fails(capsys, tmp_path, cfg, f"model: !!python/object/apply:os.system ['touch {marker}']\n",
                "policy.yaml", "not valid YAML")
    assert not marker.exists()


def test_apply_output_below_a_file(capsys, tmp_path, cfg):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = write_yaml(tmp_path / "config.yaml", cfg)
    policy = write_yaml(tmp_path / "policy.yaml", quant_policy({"head": {"format": "bf16"}}))
    code, err = run_cli(capsys, "apply", policy, "--config", config, "--out", blocker / "small.pt", "--no-measure")
    assert_one_line_error(code, err, "--out", str(blocker))

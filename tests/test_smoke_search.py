import pandas as pd

import autocompress
from autocompress.config import config_from_dict
from autocompress.results import RECORD_COLUMNS
from autocompress.rundir import RunDir


def test_tiny_end_to_end_search_writes_a_run_directory(tiny_config, tmp_path):
    result = autocompress.search(config_from_dict(tiny_config), progress=False)
    run = tmp_path / "run"
    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 6
    assert {"number", "state", "feasible", "val_accuracy", "latency_ms", "memory_mb", "duration_s", "error"} <= set(trials.columns)
    # the uncompressed baseline is trial 0 and is over a 0.9x budget by construction
    assert trials.loc[0, "baseline"] == "uncompressed"
    assert (run / "config.yaml").is_file()
    # the resolved space is saved: every searched parameter (a column of trials.csv) with its identity
    identities = RunDir(run).read_identities(notes := [])
    assert not notes and identities is not None
    assert set(identities) == set(trials.columns) - set(RECORD_COLUMNS)
    assert {c: str(v) for c, v in identities.items()} == {c: str(trials.loc[0, c]) for c in identities}
    pareto = pd.read_csv(run / "pareto.csv")
    if result.feasible:
        assert (pareto["latency_ms"] <= result.limit).all()
        assert pareto["test_accuracy"].notna().all()
        assert (run / "best_policy.yaml").is_file()


def test_after_the_baselines_the_search_tries_their_composition(tiny_config, tmp_path):
    """A memory budget (exact costs, no timing noise): bf16 halves the Linears, MLP width 0.25 removes most of fc1
    and fc2; neither alone meets 0.35x, together they do. The composed baseline follows the uniform ones."""
    import yaml

    space = {"techniques": {
        "quantization": {"layers": [{"match": "re:blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.(fc1|fc2))",
                                     "format": ["fp32", "bf16"]}]},
        "pruning": {"layers": [{"match": "re:blocks\\.\\d+", "mlp": [1.0, 0.5, 0.25]}]},
    }}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    config = {**tiny_config, "space": str(tmp_path / "space.yaml"), "budget": "memory=0.35x",
              "search": {"trials": 6, "sampler": "random", "seed": 0, "strategy": "sample"}}
    result = autocompress.search(config_from_dict(config), progress=False)
    trials = result.trials.set_index("number")
    assert trials.loc[0, "baseline"] == "uncompressed"
    # bf16 and MLP 0.25 measure within 1% of each other here: either may start the chain, the other is added
    assert trials.loc[4, "baseline"] in ("composed: uniform quantization.format=bf16 + pruning.mlp=0.25",
                                         "composed: uniform pruning.mlp=0.25 + quantization.format=bf16")
    assert set(trials.loc[1:3, "baseline"]) == {
        "uniform quantization.format=bf16", "uniform pruning.mlp=0.5", "uniform pruning.mlp=0.25"}
    composed = trials.loc[4]
    formats = {v for k, v in composed.items() if k.endswith(":quantization.format")}
    widths = {v for k, v in composed.items() if k.endswith(":pruning.mlp")}
    assert formats == {"bf16"} and widths == {0.25}
    assert composed["memory_mb"] < trials.loc[1:3, "memory_mb"].min()
    assert not trials.loc[1:3, "feasible"].any() and composed["feasible"], "only the composition meets 0.35x"
    assert len(trials) == 6, "it counts as one of the trials"


def test_the_saved_best_policy_says_what_was_applied_not_the_settings_a_removed_branch_made_void(
        tiny_config, tmp_path, plugins):
    """A trial that removes block 0's attention and also sets a format for its qkv (a sampler can draw both): the
    run's best_policy.yaml leaves the void qkv setting out, keeps every other, and best_model.pt rebuilds from it."""
    import yaml

    from autocompress.compose import load_compressed
    from autocompress.policy import Policy
    from autocompress.runner import prepare
    from autocompress.search import finish_run
    from autocompress.search.optuna_backend import OptunaBackend
    from autocompress.search.study import open_study

    space = {"techniques": {
        "pruning": {"layers": [{"match": "re:blocks\\.\\d+", "heads": [1.0, 0.0]}]},
        "quantization": {"layers": [{"match": "re:blocks\\.\\d+\\.attn\\.qkv", "format": ["fp32", "bf16"]}]},
    }}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    config = {**tiny_config, "space": str(tmp_path / "space.yaml"), "budget": "memory=0.9x",
              "search": {"trials": 1, "seed": 0, "strategy": "sample", "baselines": False, "finalize_steps": 0}}
    run = prepare(config_from_dict(config), plugins=plugins, log=lambda _: None)  # from the checkpoint: rebuildable
    params = {"blocks.0:pruning.heads": 0.0, "blocks.1:pruning.heads": 1.0,
              "blocks.0.attn.qkv:quantization.format": "bf16", "blocks.1.attn.qkv:quantization.format": "bf16"}
    assert set(params) == {d.name for d in run.space.dimensions}
    with open_study(run, tmp_path, resume=False) as study:
        study.optuna.enqueue_trial(params)
    with open_study(run, tmp_path, resume=True) as study:
        OptunaBackend().run(run, study, tmp_path, True, log=lambda _: None)
        rows = study.rows()
    result = finish_run(run, rows, tmp_path, log=lambda _: None)
    assert result.feasible, "removing one attention meets 0.9x of the memory"

    saved = Policy.load(tmp_path / "best_policy.yaml")
    assert saved.techniques["pruning"].layers == {"blocks.0": {"heads": 0.0}}
    assert saved.techniques["quantization"].layers == {"blocks.1.attn.qkv": {"format": "bf16"}}
    assert result.best_policy.to_dict() == saved.to_dict()
    rebuilt, policy = load_compressed(tmp_path / "best_model.pt", plugins.techniques)
    assert policy.to_dict() == saved.to_dict()
    modules = {name for name, _ in rebuilt.named_modules()}
    assert "blocks.0.attn.qkv" not in modules and "blocks.1.attn.qkv" in modules

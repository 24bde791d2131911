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

import pandas as pd

import autocompress
from autocompress.config import config_from_dict


def test_tiny_end_to_end_search_writes_a_run_directory(tiny_config, tmp_path):
    result = autocompress.search(config_from_dict(tiny_config), progress=False)
    run = tmp_path / "run"
    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 6
    assert {"number", "state", "feasible", "val_accuracy", "latency_ms", "memory_mb", "duration_s", "error"} <= set(trials.columns)
    # the uncompressed baseline is trial 0 and is over a 0.9x budget by construction
    assert trials.loc[0, "baseline"] == "uncompressed"
    assert (run / "config.yaml").is_file()
    pareto = pd.read_csv(run / "pareto.csv")
    if result.feasible:
        assert (pareto["latency_ms"] <= result.limit).all()
        assert pareto["test_accuracy"].notna().all()
        assert (run / "best_policy.yaml").is_file()

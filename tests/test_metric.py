"""A user's own metric: what the search maximizes on the validation split and reports on the test split."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

import autocompress
from autocompress.config import config_from_dict


def top2(model, split) -> float:
    """Top-2 accuracy on the first 300 images of ``split`` (deliberately not the builtin)."""
    with torch.inference_mode():
        top = model(split.images[:300]).topk(2, -1).indices
    return float((top == split.labels[:300, None]).any(-1).float().mean())


def test_a_users_metric_is_what_the_search_maximizes_and_reports(tiny_config, trained_tiny, fmnist, tmp_path):
    seen: list[int] = []

    def metric(model, split):
        seen.append(len(split))
        return top2(model, split)

    space = {"techniques": {"pruning": {"layers": [{"match": "re:blocks\\.\\d+", "mlp": [1.0, 0.5, 0.25]}]}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    config = {**tiny_config, "space": str(tmp_path / "space.yaml"), "budget": "memory=0.8x",
              "search": {"trials": 4, "seed": 0, "finalize_steps": 0}}
    result = autocompress.search(config_from_dict(config), metric=metric, progress=False, log=lambda _: None)
    model, _ = trained_tiny
    from autocompress.data import Dataset  # noqa: F401 - the splits the search used are the config's

    saved = yaml.safe_load((tmp_path / "run" / "baseline.yaml").read_text())
    assert saved["metric"] == "metric"
    assert result.baseline["val_accuracy"] == pytest.approx(top2(model, result_split(config, "val")))
    assert result.baseline["test_accuracy"] == pytest.approx(top2(model, result_split(config, "test")))
    sizes = {len(result_split(config, "val")), len(result_split(config, "test"))}
    assert sizes <= set(seen), "scored on the validation split during the search and on the test split at the end"
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    scored = trials["val_accuracy"].dropna()
    assert len(scored) >= 1 and all(abs(v * 300 - round(v * 300)) < 1e-3 for v in scored), "top-2 on 300 images"


def result_split(config: dict, name: str):
    from autocompress.config import config_from_dict
    from autocompress.runner import load_data

    return getattr(load_data(config_from_dict(config)), name)

"""Distributed search: trials as Ray Tune trials (a local Ray, a two-node cluster on this machine, early stopping by
a Ray scheduler, resume after an interruption) and Optuna workers sharing one journal storage.

Trials are few and cheap: what is under test is where trials run and how they are counted, not the compression.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from torch import nn

from autocompress import hookimpl
from autocompress.config import config_from_dict
from autocompress.errors import InputError, SearchInterrupted
from autocompress.pluginmanager import load_plugins
from autocompress.results import RECORD_COLUMNS
from autocompress.search import search
from autocompress.search.storage import check_storage_url, open_storage
from autocompress.search.study import record_of
from autocompress.technique import Stage, Technique, TrialStopped
from autocompress.testing import TechniquePlugin

ray = pytest.importorskip("ray")

QUANT_HEAD_SPACE = {"techniques": {"quantization": {"layers": [
    {"match": "re:blocks\\.\\d+\\.mlp\\.fc1", "format": ["bf16", "int8_dynamic"]},
    {"match": "head", "format": ["bf16"]},
]}}}


def small_config(tiny_config: dict, tmp_path: Path, trials: int, space: dict | None = None, **search_opts) -> dict:
    """The tiny ViT on real Fashion-MNIST, one thread per trial, a small quantization space."""
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space or QUANT_HEAD_SPACE))
    config = dict(tiny_config, space=str(path), budget="memory=0.9x")
    config["target"] = {**config["target"], "threads": 1, "warmup": 1, "repeats": 3}
    config["search"] = {**config["search"], "trials": trials, **search_opts}
    return config


def read_trials(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "trials.csv", keep_default_na=False, na_values=[""])


def test_ray_trials_land_on_both_nodes_of_a_two_node_cluster_and_keep_the_budget(tiny_config, tmp_path):
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        config = config_from_dict(small_config(tiny_config, tmp_path, trials=4))
        result = search(config, backend="ray", progress=False, log=lambda _: None,
                        backend_options={"address": cluster.address, "cpus_per_trial": 1})
        assert not ray.is_initialized()  # the driver left the cluster it joined
        nodes = {node.node_id for node in cluster.list_all_nodes()}
    finally:
        ray.shutdown()
        cluster.shutdown()
    run = tmp_path / "run"
    trials = read_trials(run)
    assert sorted(trials["number"]) == [0, 1, 2, 3]
    assert set(trials["node"]) == nodes and len(nodes) == 2
    feasible = trials[trials["feasible"]]
    assert (feasible["memory_mb"] <= result.limit).all()
    assert (trials[~trials["feasible"]]["memory_mb"] > result.limit).all()
    assert (run / "pareto.csv").is_file() and (run / "config.yaml").is_file()
    if result.feasible:
        assert (run / "best_policy.yaml").is_file()
    # the budget reached Optuna as a constraint (not folded into a metric), as in the Optuna backend
    study = optuna.load_study(study_name="autocompress", storage=f"sqlite:///{run / 'study.db'}")
    for t in study.trials:
        assert t.system_attrs["constraints:budget"] == pytest.approx(record_of(t)["memory_mb"] - result.limit)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs) for the tests below; the backend uses a Ray it finds initialised."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class FakeTraining(Technique):
    """A recovery technique that only reports a fixed probe at the distillation steps: 0.9 ('good') or 0.1 ('bad')."""

    name = "fake_training"
    stage = Stage.RECOVERY
    global_knobs = {"curve": "none"}

    def candidate_layers(self, model: nn.Module) -> list[str]:
        return []

    def apply(self, model, settings, ctx):
        curve = settings.options.get("curve", "none")
        if ctx.structure_only or curve == "none" or ctx.report is None:
            return model
        for step in (25, 50, 100):
            if ctx.report(step, 0.9 if curve == "good" else 0.1):
                raise TrialStopped(f"step {step}")
            time.sleep(0.2)
        return model


def test_a_search_on_a_local_ray_writes_the_usual_run_directory_and_asha_stops_poor_training(
    tiny_config, tmp_path, local_ray
):
    space = {"techniques": {**QUANT_HEAD_SPACE["techniques"], "fake_training": {"options": {"curve": ["good", "bad"]}}}}
    # objective single: Ray's ASHA decides; random sampler, seed 1: trials 3-5 train 'good', 'bad', 'bad'
    config = small_config(tiny_config, tmp_path, trials=6, space=space, objective="single",
                          pruner="successive_halving", sampler="random", seed=1)
    config["budget"] = "memory=1.0x"  # every policy fits, so every 'good' or 'bad' trial trains
    search(config_from_dict(config), backend="ray", plugins=load_plugins(extra=[TechniquePlugin("fake_training", FakeTraining())]),
           progress=False, log=lambda _: None, backend_options={"max_concurrent": 1, "cpus_per_trial": 1})

    trials = read_trials(tmp_path / "run")
    assert sorted(trials["number"]) == list(range(6))
    assert trials.loc[0, "baseline"] == "uncompressed"
    assert trials["node"].str.fullmatch(r"[0-9a-f]{56}").all()  # the Ray node that ran each trial
    params = [c for c in trials.columns if c not in RECORD_COLUMNS]
    assert list(trials.columns) == RECORD_COLUMNS + sorted(params)  # the columns of every backend's trials.csv
    assert {"blocks.0.mlp.fc1:quantization.format", "head:quantization.format", "fake_training.curve"} <= set(params)

    curve = trials["fake_training.curve"]
    pruned = trials[trials["state"] == "PRUNED"]
    assert (curve[pruned.index] == "bad").all()
    assert pruned["skipped"].str.contains("successive halving").all()
    assert pruned["progress"].str.fullmatch("25:0.1000").all()  # stopped at its first probe
    # trials run one at a time: every 'bad' trial after the first 'good' one is stopped, no 'good' one is
    first_good = trials[curve == "good"]["number"].min()
    later_bad = trials[(curve == "bad") & (trials["number"] > first_good)]
    assert len(later_bad) >= 1 and (later_bad["state"] == "PRUNED").all()
    assert (trials[curve == "good"]["state"] == "COMPLETE").all()
    assert (trials[curve == "good"]["progress"] == "25:0.9000 50:0.9000 100:0.9000").all()


class InterruptAfter:
    """Sends this process the signal Tune treats as Ctrl-C once ``n`` trials have finished."""

    __name__ = "interrupt_after"

    def __init__(self, n: int) -> None:
        self.left = n

    @hookimpl
    def autocompress_trial_completed(self, record):
        self.left -= 1
        if self.left == 0:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_an_interrupted_ray_run_resumes_without_losing_finished_trials(tiny_config, tmp_path, local_ray):
    config = small_config(tiny_config, tmp_path, trials=5)
    options = {"max_concurrent": 1, "cpus_per_trial": 1}
    with pytest.raises(SearchInterrupted):
        search(config_from_dict(config), backend="ray", plugins=load_plugins(extra=[InterruptAfter(2)]),
               progress=False, log=lambda _: None, backend_options=options)
    run = tmp_path / "run"
    before = read_trials(run)
    assert len(before) >= 2 and before["number"].is_unique

    said: list[str] = []
    search(config_from_dict(config), backend="ray", resume=True, progress=False, log=said.append,
           backend_options=options)
    after = read_trials(run)
    assert any("restored the Ray Tune experiment" in line for line in said)
    assert len(after) == 5 and after["number"].is_unique
    kept = after.set_index("number").loc[before["number"]].reset_index()
    columns = ["number", "policy", "latency_ms", "memory_mb", "duration_s", "node"]
    pd.testing.assert_frame_equal(kept[columns], before[columns].reset_index(drop=True))


def test_sqlite_is_refused_as_a_shared_storage(tmp_path):
    with pytest.raises(InputError, match="not safe for several concurrent workers") as err:
        check_storage_url(f"sqlite:///{tmp_path / 'study.db'}")
    assert err.value.field == "--storage"
    with pytest.raises(InputError, match="not safe"):
        check_storage_url(str(tmp_path / "study.db"))
    assert check_storage_url("journal:" + str(tmp_path / "x.journal")) == "journal"
    assert check_storage_url("postgresql://user@host/db") == "rdb"


def test_the_cli_refuses_sqlite_storage_and_ray_options_without_ray(tiny_config, tmp_path, capsys):
    from autocompress.cli import main

    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config))
    assert main(["search", str(config_path), "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "--storage: SQLite is not safe" in capsys.readouterr().err
    assert main(["search", str(config_path), "--ray-address", "127.0.0.1:6379"]) == 2
    assert "--ray-address: only applies with --backend ray" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_two_worker_processes_on_one_journal_share_the_trials_without_loss_or_duplication(tiny_config, tmp_path):
    # trials long enough (~1 s of timing each) that the second worker, which may start seconds after the first
    # (imports, data), still finds some left: with 0.3 s trials the first one sometimes ran all of them alone
    n = 8
    config = small_config(tiny_config, tmp_path, trials=n)
    config["target"]["repeats"] = 150
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    journal = tmp_path / "shared" / "study.journal"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    workers = [
        subprocess.Popen([sys.executable, "-m", "autocompress.cli", "search", str(config_path), "--storage",
                          f"journal:{journal}", "--out", str(tmp_path / f"worker{i}"), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode in (0, 3), output  # 3: no policy met the budget, still a complete run
    assert sum("created the shared study" in out for out in outputs) == 1

    tables = [read_trials(tmp_path / f"worker{i}") for i in range(2)]
    for trials in tables:
        assert sorted(trials["number"]) == list(range(n))  # every trial once, none lost
        assert trials["baseline"].dropna().is_unique  # baselines enqueued by one worker only
        assert trials.loc[trials["number"] == 0, "baseline"].item() == "uncompressed"
    assert list(tables[0]["policy"]) == list(tables[1]["policy"])
    pids = {str(w.pid) for w in workers}
    assert {node.rsplit(":", 1)[1] for node in tables[0]["node"]} == pids  # both workers ran trials

    study = optuna.load_study(study_name="autocompress", storage=open_storage(f"journal:{journal}"))
    counted = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert [t.number for t in counted] == list(range(n))
    assert all(t.state.is_finished() for t in study.trials)


def test_a_ray_trial_skips_by_the_drivers_latency_correction_as_of_its_start(monkeypatch):
    """The solver's later waves correct the latency table in the driver (seeding.second_wave); a Ray worker, which
    decides whether a candidate predicted over the limit is skipped, gets the driver's correction with each trial."""
    from types import SimpleNamespace

    from ray import tune

    from autocompress.search import ray_searcher, ray_worker

    trial = SimpleNamespace(number=7, params={"quantization.format": "int8_dynamic"})
    study = SimpleNamespace(quota_reached=lambda: False, ask=lambda: trial)
    driver_run = SimpleNamespace(latency_correction=1.18)
    ray_searcher.set_driver(ray_searcher.Driver(run=driver_run, study=study))
    try:
        suggested = ray_searcher.StudySearcher().suggest("tune-trial-1")
    finally:
        ray_searcher.set_driver(None)
    assert suggested["latency_correction"] == 1.18 and suggested["number"] == 7

    worker_run = SimpleNamespace(latency_correction=1.0)  # a worker's own run starts uncorrected
    seen = []
    monkeypatch.setattr(ray_worker, "worker_run", lambda spec: worker_run)
    monkeypatch.setattr(ray_worker, "evaluate_params",
                        lambda run, params, number, report: seen.append(run.latency_correction) or {"number": number})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-a"))
    monkeypatch.setattr(tune, "report", lambda result: None)
    ray_worker.tune_trial(suggested, spec=None)
    assert seen == [1.18]

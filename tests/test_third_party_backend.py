"""A search backend from outside the package, met the way an outsider meets it: a distribution on the path whose
``autocompress`` entry point registers a backend (``autocompress_register_backends``), chosen by name and run on a
tiny search; the run directory is the usual one, because the study, not the backend, owns the trials."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from autocompress.pluginmanager import load_plugins
from autocompress.search import search

SPACE = {"techniques": {"quantization": {"layers": [
    {"match": "re:blocks\\.\\d+\\.mlp\\.fc1", "format": ["fp32", "bf16", "int8_dynamic"]},
    {"match": "head", "format": ["fp32", "bf16"]},
]}}}

#: a backend that evaluates the study's trials in a thread pool, and says so in each record's ``node``
POOL_BACKEND = """
    import concurrent.futures

    from autocompress import hookimpl
    from autocompress.runner import evaluate_params

    CALLS = []


    class PoolBackend:
        name = "pool"
        parallel = False

        def run(self, run, study, run_dir, resume, log, workers=1):
            CALLS.append(workers)
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                while not study.quota_reached():
                    trial = study.ask()
                    if trial is None:
                        break
                    record = pool.submit(evaluate_params, run, dict(trial.params), trial.number).result()
                    record["node"] = "pool"
                    study.tell(trial, record)


    @hookimpl
    def autocompress_register_backends(register):
        register(PoolBackend())
"""

TAKES_OPTUNA = """
    class Impostor:
        name = "optuna"

        def run(self, run, study, run_dir, resume, log):
            raise AssertionError("never chosen")


    def autocompress_register_backends(register):
        register(Impostor())
"""

TAKES_POOL = TAKES_OPTUNA.replace('name = "optuna"', 'name = "pool"')


def make_distribution(site: Path, dist: str, module: str, source: str) -> None:
    """A minimal installed distribution: one module plus the ``.dist-info`` that declares its entry point."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[autocompress]\n{module} = {module}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder on ``sys.path`` standing for site-packages; the modules imported from it are forgotten after."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("AUTOCOMPRESS_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("AUTOCOMPRESS_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield folder
    for name in [n for n, m in sys.modules.items() if str(getattr(m, "__file__", "") or "").startswith(str(folder))]:
        del sys.modules[name]


def test_hook_autocompress_register_backends(site: Path, tiny_config: dict, tmp_path: Path) -> None:
    make_distribution(site, "autocompress-pool", "autocompress_pool", POOL_BACKEND)
    plugins = load_plugins()
    assert plugins.backend_owners["pool"] == "autocompress_pool"
    assert next(p for p in plugins.info if p.name == "autocompress_pool").backends == ("pool",)

    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    config = dict(tiny_config, space=str(tmp_path / "space.yaml"), budget="memory=0.9x")
    config["target"] = {**config["target"], "threads": 1, "warmup": 1, "repeats": 3}
    config["search"] = {**config["search"], "trials": 4, "sampler": "random"}
    seen = []

    class Listener:
        @staticmethod
        def autocompress_trial_completed(record):
            seen.append(record["number"])

    plugins.manager.register(Listener(), name="listener")
    result = search(config, backend="pool", backend_options={"workers": 2}, plugins=plugins, progress=False,
                    log=lambda _: None)

    assert sys.modules["autocompress_pool"].CALLS == [2]  # chosen by name, given its own options
    trials = pd.read_csv(Path(config["out"]) / "trials.csv", keep_default_na=False, na_values=[""])
    assert sorted(trials["number"]) == [0, 1, 2, 3] and list(trials["node"]) == ["pool"] * 4
    assert trials.loc[trials["number"] == 0, "baseline"].item() == "uncompressed"  # the study's queue came first
    assert sorted(seen) == [0, 1, 2, 3]  # the progress bar and the hook heard every trial
    completed = trials[trials["state"] == "COMPLETE"]
    assert list(completed["feasible"]) == list(completed["memory_mb"] <= result.limit)
    assert (Path(config["out"]) / "pareto.csv").is_file() and (Path(config["out"]) / "study.db").is_file()


def test_a_backend_name_taken_is_refused_naming_both_plugins(site: Path) -> None:
    make_distribution(site, "autocompress-pool", "autocompress_pool", POOL_BACKEND)
    make_distribution(site, "autocompress-zz-impostor", "zz_impostor", TAKES_OPTUNA)
    make_distribution(site, "autocompress-zz-second-pool", "zz_second_pool", TAKES_POOL)
    plugins = load_plugins()
    errors = {p.name: p.error for p in plugins.errors}
    assert "backend 'optuna' is already registered by plugin 'autocompress'" in errors["zz_impostor"]
    assert "backend 'pool' is already registered by plugin 'autocompress_pool'" in errors["zz_second_pool"]
    assert plugins.backends["optuna"] == "autocompress.search.optuna_backend:OptunaBackend"
    assert plugins.backend_owners["pool"] == "autocompress_pool"

"""The Ray backend (``--backend ray``): the same search, with each trial a Ray Tune trial on a Ray cluster.

* Where: without ``--ray-address`` a local Ray is started with this machine's CPUs and stopped at the end; with one,
  the search joins that cluster (``ray start --head`` on one machine, ``ray start --address=HEAD:6379`` on the
  others; every node needs autocompress, its plugins, the data and the checkpoint at the same paths).
* What runs where: the driver (this process) measures the baseline, owns the Optuna study and writes the run
  directory (``finish_run``, as for every backend). A trial gets the config and the baseline, loads the model and
  data once per worker process and keeps them for later trials (``ray_worker.py``). Each trial reserves
  ``--cpus-per-trial`` CPUs, by default the config's ``target.threads``, so trials sharing a node do not share
  cores while their latency is measured.
* The budget: enforced through the Optuna study that ``StudySearcher`` drives by ask/tell, with the budget as a
  constraint exactly as in the Optuna backend (Ray's ``OptunaSearch`` would pass Optuna only objective values); see
  ``ray_searcher.py``.
* Early stopping of training techniques (distillation) is a Tune scheduler on their probes: the median rule for the
  default two-objective search, Ray's ASHA when ``search.objective`` is ``single`` (``search.pruner``).
* Resume (``--resume``): Tune's experiment is restored with ``Tuner.restore`` (its history and the scheduler's
  rungs). Trials that were running when the run stopped have nothing to resume from (a trial is one compression and
  evaluation, without checkpoints): they are failed as interrupted in the study and queued again, as the Optuna
  backend does. Finished trials are kept.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from autocompress.errors import InputError, SearchInterrupted
from autocompress.pluginmanager import IN_CODE
from autocompress.rundir import RunDir
from autocompress.runner import RunContext
from autocompress.search.ray_worker import WorkerSpec, tune_trial
from autocompress.search.study import SearchStudy

__all__ = ["RayBackend", "connect"]

EXPERIMENT = "tune"  # Tune's experiment folder, under RUN_DIR/ray


class RayBackend:
    name = "ray"
    parallel = True

    def run(self, run: RunContext, study: SearchStudy, run_dir: Path, resume: bool, log: Callable[[str], None],
            address: str | None = None, max_concurrent: int | None = None, cpus_per_trial: float | None = None,
            num_cpus: int | None = None) -> None:
        """Run the search's trials on Ray (see the module docstring)."""
        from autocompress.search import ray_searcher

        run_dir = run_dir.resolve()
        cpus = float(cpus_per_trial or run.config.target.threads)
        started_ray = connect(address, num_cpus, log)
        try:
            _check_resources(cpus)
            ray_searcher.set_driver(ray_searcher.Driver(run, study, max_concurrent))
            slots = _slots(cpus, max_concurrent)
            tuner = _tuner(run, run_dir, resume, cpus, slots, log)
            began = time.monotonic()
            with _quiet_tune():
                tuner.fit()
            timeout = run.config.search.timeout_s
            if not study.quota_reached() or study.running():
                if not (timeout and time.monotonic() - began >= timeout * 0.99):
                    # Tune stopped early on Ctrl-C (it saved its state for Tuner.restore)
                    raise SearchInterrupted(study.rows())
        finally:
            ray_searcher.set_driver(None)
            if started_ray:
                import ray

                ray.shutdown()


def connect(address: str | None, num_cpus: int | None = None, log: Callable[[str], None] = print) -> bool:
    """Start a local Ray (no address) or join a cluster; returns whether this call did it (and must shut it down).
    A Ray already initialised in this process (a notebook, a test) is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **quiet)
            log(f"joined the Ray cluster at {address}")
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
            log(f"started a local Ray with {int(ray.cluster_resources().get('CPU', 0))} CPUs")
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise InputError("--ray-address", f"cannot start or join {where} ({exc})") from None
    return True


def worker_spec(run: RunContext) -> WorkerSpec:
    """What a trial needs to rebuild the run in its own process: the config (paths made absolute, no training of a
    missing checkpoint on a worker), the driver's baseline and the techniques. The model and data travel only when
    no config describes them (given to ``search()`` as objects)."""
    config = copy.deepcopy(run.config)
    config.base_dir = str(Path(config.base_dir).resolve())
    config.model.train_if_missing = None
    _ship_code_registered_techniques(run)
    return WorkerSpec(
        key=uuid.uuid4().hex, config=config, baseline=run.baseline.to_dict(), techniques=dict(run.techniques),
        model=None if run.rebuildable else run.model, data=None if run.data_from_config else run.data,
        metric=run.metric, costs=dict(run.plugins.costs), runtimes=dict(run.plugins.runtimes),
    )


def _ship_code_registered_techniques(run: RunContext) -> None:
    """A technique registered in code (a notebook, a test) lives in a module the workers may not be able to import:
    send its module's code with it (pickled by value) instead of by name."""
    from ray import cloudpickle

    in_code = {info.name for info in run.plugins.info if info.distribution == IN_CODE}
    for name, technique in run.techniques.items():
        module = sys.modules.get(type(technique).__module__)
        if run.plugins.owners.get(name) in in_code and module is not None and module.__name__ != "__main__":
            cloudpickle.register_pickle_by_value(module)


def _slots(cpus: float, max_concurrent: int | None) -> int:
    """How many trials fit on the cluster at once (per node, whole trials only), capped by ``--max-concurrent``."""
    import ray

    fit = sum(int(n["Resources"].get("CPU", 0.0) // cpus) for n in ray.nodes() if n.get("Alive"))
    return max(1, min(fit, max_concurrent or fit))


def _check_resources(cpus: float) -> None:
    import ray

    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    if not node_cpus or max(node_cpus) < cpus:
        raise InputError("--cpus-per-trial", f"a trial needs {cpus:g} CPUs but the largest Ray node has "
                         f"{max(node_cpus, default=0):g} (lower --cpus-per-trial or target.threads)")


def _tuner(run: RunContext, run_dir: Path, resume: bool, cpus: float, slots: int, log: Callable[[str], None]):
    """A Tuner restored from the interrupted session's experiment (``--resume``), or a fresh one.

    ``slots`` (trials that can run at once) is also how many trials Tune places ahead: with its default of one for
    a custom searcher, a cluster's workers would start one after another and short trials would all run on the
    first worker that came up (its actor is reused); placing all slots at once starts every worker together.
    The searcher does not let Tune's ConcurrencyLimiter limit anything (``StudySearcher.set_max_concurrency``).
    """
    from ray import tune

    from autocompress.search.ray_searcher import StudySearcher, make_scheduler

    trainable = tune.with_resources(tune.with_parameters(tune_trial, spec=worker_spec(run)), {"cpu": cpus})
    root = RunDir(run_dir).ray
    if resume and tune.Tuner.can_restore(str(root / EXPERIMENT)):
        try:
            tuner = tune.Tuner.restore(str(root / EXPERIMENT), trainable=trainable, resume_unfinished=False,
                                       resume_errored=False, restart_errored=False)
            log(f"restored the Ray Tune experiment in {root / EXPERIMENT}")
            return tuner
        except Exception as exc:  # noqa: BLE001 - the study still holds every finished trial
            log(f"warning: cannot restore the Ray Tune experiment ({type(exc).__name__}: {exc}); starting a new one")
    name, n = EXPERIMENT, 1
    while (root / name).exists():
        n += 1
        name = f"{EXPERIMENT}-{n}"
    search = run.config.search
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=StudySearcher(), scheduler=make_scheduler(search.objective, search.pruner), num_samples=-1,
            max_concurrent_trials=slots, reuse_actors=True, time_budget_s=search.timeout_s,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(root), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Our progress bar replaces Tune's tables; Tune's newer reporter prints its header even with ``verbose=0``,
    the older one (chosen by this variable while ``fit`` runs) prints nothing."""
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.config.get('number', trial.trial_id)}"

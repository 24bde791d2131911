"""Run a search: check the inputs, prepare the run, open its study, let the backend evaluate trials, then write the
results (the Pareto front with test accuracy, the files, the report).

Whichever backend evaluated the trials (``backend.py``), their rows come from the same study (``study.py``), so the
run directory looks the same.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from torch import nn

from autocompress.compose import without_void
from autocompress.config import RunConfig, config_from_dict, finalize_steps, load_config, validate
from autocompress.data import Dataset
from autocompress.errors import InputError, SearchInterrupted
from autocompress.metric import ACCURACY, Metric
from autocompress.policy import Policy
from autocompress.results import (
    SearchResult, closest_to_budget, params_of, pareto_front, summary_table, timing_drift, trials_frame,
)
from autocompress.pluginmanager import load_plugins
from autocompress.rundir import BASELINE, RunDir
from autocompress.runner import Baseline, RunContext, prepare
from autocompress.runtime import TORCH
from autocompress.search.backend import find_backend
from autocompress.search.progress import TrialProgress
from autocompress.technique import Stage, TechniqueSettings

__all__ = ["search", "finish_run"]

PARETO_TEST_ROWS = 10


def search(
    config: RunConfig | str | Path | dict | None = None,
    *,
    model: nn.Module | None = None,
    data: Dataset | None = None,
    budget: str | None = None,
    space: str | None = None,
    trials: int | None = None,
    sampler: str | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    backend: str | None = None,
    plugins=None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    backend_options: dict[str, Any] | None = None,
    metric: Callable[[nn.Module, Any], float] | Metric | None = None,
) -> SearchResult:
    """Search compression policies for ``model`` on ``data`` under ``budget``; returns a :class:`SearchResult`.

    ``config`` is a config file, a dict or a :class:`RunConfig`; keyword arguments override it. A model and data
    given directly are used as they are (the model's weights are taken as the baseline).

    ``metric``: the score maximized on the validation split, ``fn(model, split) -> float`` (higher is better;
    ``split`` has ``images`` and ``labels``); accuracy by default (see ``autocompress/metric.py``).

    ``backend``: a builtin (``optuna``, ``ray``) or a plugin's (``autocompress_register_backends``).
    ``backend_options``: ``storage`` (an Optuna storage URL: the study is shared with other processes, see
    ``search/study.py`` and ``search/storage.py``); the others go to the backend: with ``backend="ray"``
    ``address`` (a Ray cluster to join), ``max_concurrent``, ``cpus_per_trial`` and ``num_cpus`` (of a local Ray),
    see ``search/ray_backend.py``.
    """
    config = _as_config(config)
    overrides = {"budget": budget, "space": space, "out": None if out is None else str(Path(out).resolve())}  # cwd-relative, like any CLI path
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if trials is not None:
        config.search.trials = trials
    if sampler is not None:
        config.search.sampler = sampler
    if seed is not None:
        config.search.seed = seed
    if backend is not None:
        config.search.backend = backend
    if model is not None and not config.model.name:
        config.model.name = type(model).__name__
    validate(config)
    if plugins is None:
        plugins = load_plugins(block=config.plugins.get("block", ()))
        for bad in plugins.errors:
            log(f"warning: plugin {bad.name!r} ({bad.distribution}) not loaded: {bad.error}")
    chosen = find_backend(config.search.backend, plugins)
    from autocompress.search import study as studies  # Optuna is imported when a search runs, not with autocompress

    run_dir = config.resolve_path(config.out)
    options = dict(backend_options or {})
    storage = options.pop("storage", None)
    if storage is not None:
        # processes sharing one study: the run directory may be another worker's too, and the baseline is the one
        # the study's creator measured, so the budget means the same limit everywhere
        baseline = studies.shared_baseline(storage)
        if resume and baseline is None:
            raise InputError("--storage", f"nothing to resume: no study with a baseline in {storage}")
    else:
        _check_run_dir(run_dir, resume)
        baseline = _saved_baseline(run_dir) if resume else None
    if resume:
        _check_same_run(config, run_dir, given={k for k in ("budget", "space") if overrides[k] is not None})
    run = prepare(config, plugins=plugins, model=model, data=data, baseline=baseline, log=log, metric=metric)

    try:  # nothing is written before every input has been checked
        RunDir(run_dir).write_start(config.to_dict(), run.baseline.to_dict(), run.space)
    except OSError as exc:
        raise InputError("out", f"cannot write the run directory {run_dir} ({exc.strerror or exc})") from None

    if config.search.strategy == "solve" and not studies.study_started(run_dir, storage):
        _plan(run, run_dir, progress, log)
    started = time.perf_counter()
    try:
        with studies.open_study(run, run_dir, resume, storage=storage, parallel=chosen.parallel, log=log) as study:
            study.on_trial = listener = TrialProgress(run, config.search.trials, progress, log, done=study.finished())
            try:
                chosen.run(run, study, run_dir, resume, log, **options)
                if study.shared:  # each worker's run directory ends with the whole study
                    study.wait_for_running(log)
            except KeyboardInterrupt:
                if not study.shared:  # this process alone runs the study's trials
                    study.close_running("interrupted (Ctrl-C)")
                raise SearchInterrupted(study.rows()) from None
            finally:
                listener.close()
            rows = study.rows()
    except SearchInterrupted as exc:  # Ctrl-C: keep what finished, then stop
        RunDir(run_dir).write_trials(trials_frame(exc.rows, run.baseline.latency_ms))
        raise
    run.phases["trials"] = time.perf_counter() - started
    return finish_run(run, rows, run_dir, log=log)


def _plan(run: RunContext, run_dir: Path, progress: bool, log: Callable[[str], None]) -> None:
    """The solver's seeds (``seeding.py``); without any, the uniform baselines start the search instead."""
    from autocompress.seeding import plan_seeds

    plan = plan_seeds(run, run_dir, log=log, progress=progress)
    run.seeds, run.solver = plan.seeds, plan.solver
    run.phases.update(plan.phases)
    if not plan.seeds and run.config.search.baselines == "auto":
        log(f"solver: no seeds ({plan.why_none}); the uniform baselines start the search instead")
        run.config.search.baselines = True


def finish_run(run: RunContext, rows: list[dict[str, Any]], run_dir: Path | None, log: Callable[[str], None] = print) -> SearchResult:
    """From trial rows to the result: Pareto front, test accuracy of its members, files."""
    metric = run.budget.metric
    frame = trials_frame(rows, run.baseline.latency_ms)
    drift = timing_drift(frame, run.baseline.latency_ms)
    if drift:
        log(f"warning: {drift}")
    front = pareto_front(frame, metric)
    baseline = run.baseline.to_dict()
    score = getattr(run, "metric", None) or ACCURACY
    baseline["test_accuracy"] = score(run.model, run.data.test)
    steps = finalize_steps(run.config.search) if not front.empty else 0
    phases = getattr(run, "phases", {})
    best_policy = None
    best_model = None
    if not front.empty:
        tests, vals, finals, timings = [], [], [], []
        retime = getattr(run, "runtime", TORCH) is not TORCH  # the front re-timed in the target runtime
        started = time.perf_counter()
        for i, row in front.iterrows():
            if i >= PARETO_TEST_ROWS:
                tests.append(math.nan)
                vals.append(math.nan)
                finals.append(math.nan)
                continue
            policy = run.policy(params_of(row.to_dict(), frame.columns))
            seed = run.config.search.seed + int(row["number"])
            model = run.compress(policy, seed=seed)
            vals.append(score(model, run.data.val))
            finals.append(math.nan)
            if steps and i < run.config.search.finalize_top:
                model, policy, finals[-1] = _finalize(run, policy, model, vals[-1], steps, seed, log)
            # honest evaluation: with a final recovery, the test split scores only what it produced
            tests.append(score(model, run.data.test) if not steps or i < run.config.search.finalize_top
                         else math.nan)
            if retime:
                timings.append(run.retime(model))
            if i == 0:  # saved as applied: without settings of layers the policy itself removed
                best_policy, best_model = without_void(policy, run.model, model), model
        if retime:  # the rows past PARETO_TEST_ROWS were not rebuilt: not re-timed either
            front["runtime"] = run.runtime.name
            for column in ("latency_ms_final", "latency_ms_torch"):
                front[column] = [t[column] for t in timings] + [math.nan] * (len(front) - len(timings))
        if steps:
            phases["finalize"] = time.perf_counter() - started
        front["test_accuracy"] = tests
        front["val_accuracy_rebuilt"] = vals
        front["val_accuracy_finalized"] = finals
        final_val = front["val_accuracy_finalized"].where(front["val_accuracy_finalized"].notna(), front["val_accuracy"])
        front["val_drop_points"] = 100 * (baseline["val_accuracy"] - final_val)
        front["test_drop_points"] = 100 * (baseline["test_accuracy"] - front["test_accuracy"])
    closest = None if not front.empty else _closest_with_accuracy(run, frame)
    result = SearchResult(
        trials=frame, pareto=front, best_policy=best_policy, baseline=baseline, budget=str(run.budget),
        limit=run.limit, metric=metric, run_dir=run_dir, closest=closest, unit=run.budget.cost.unit,
    )
    if run_dir is not None:
        RunDir(run_dir).write_results(frame, front, baseline, best_policy)
        if best_policy is not None and run.rebuildable:
            RunDir(run_dir).write_best_model(best_model, best_policy, run.config.model.name, run.config.model.kwargs)
    log(summary_table(result))
    if phases:
        log("phases: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items()))
    if run_dir is not None:
        if phases:
            RunDir(run_dir).write_phases(phases)
        _write_report(run_dir, log)
    return result


def _finalize(run: RunContext, policy: Policy, model: nn.Module, val: float, steps: int, seed: int,
              log: Callable[[str], None]) -> tuple[nn.Module, Policy, float]:
    """The chosen policy trained back longer (each recovery technique's :meth:`Technique.finalize_options`, early
    stopped on the validation probe); kept only where it scores better on the validation split."""
    final = copy.deepcopy(policy)
    changed = False
    for name in run.space.techniques():
        technique = run.techniques.get(name)
        if technique is None or technique.stage != Stage.RECOVERY:
            continue
        settings = final.techniques.setdefault(name, TechniqueSettings())
        options = technique.finalize_options(dict(settings.options), steps)
        if options is not None:
            settings.options = options
            changed = True
    if not changed:
        return model, policy, math.nan
    started = time.perf_counter()
    trained = run.compress(final, seed=seed)
    final_val = run.metric(trained, run.data.val)
    kept = final_val >= val
    log(f"finalize: up to {steps} recovery steps on {policy.summary()}: validation accuracy {val:.4f} -> "
        f"{final_val:.4f} in {time.perf_counter() - started:.0f} s" + ("" if kept else "; the search's model is kept"))
    return (trained, final, final_val) if kept else (model, policy, final_val)


def _write_report(run_dir: Path, log: Callable[[str], None]) -> None:
    """The HTML report; its failure costs only the report, never the results already written."""
    try:
        from autocompress.report import write_report

        log(f"report: {write_report(run_dir)}")
    except Exception as exc:  # noqa: BLE001 - any bug in the report must leave the search result intact
        log(f"warning: the report could not be written ({type(exc).__name__}: {exc}); the results are saved, "
            f"retry with `autocompress report {run_dir}`")


def _closest_with_accuracy(run: RunContext, frame: Any, n: int = 3) -> Any:
    """No trial met the budget: the ``n`` nearest it, with the validation accuracy the search skipped (over-budget
    trials are not evaluated), so the user sees what relaxing the budget would buy."""
    closest = closest_to_budget(frame, run.budget.metric, run.limit, n)
    accs = []
    for _, row in closest.iterrows():
        acc = pd.to_numeric(pd.Series([row["val_accuracy"]]), errors="coerce").iloc[0]
        if pd.isna(acc):
            try:
                policy = run.policy(params_of(row.to_dict(), frame.columns))
                acc = run.metric(run.compress(policy, seed=run.config.search.seed + int(row["number"])), run.data.val)
            except Exception:  # a technique that fails here already failed or was skipped in its trial
                acc = math.nan
        accs.append(acc)
    closest["val_accuracy"] = accs
    return closest


def _as_config(config: RunConfig | str | Path | dict | None) -> RunConfig:
    if config is None:
        return RunConfig()
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        if not RunDir(run_dir).has(BASELINE):
            raise InputError("out", f"nothing to resume in {run_dir} (no {BASELINE})")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError("out", f"{run_dir} is a file, not a run directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise InputError("out", f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError("out", f"cannot create {run_dir}: {probe} is a file")
    try:  # really try (os.access says yes to root on read-only mounts and /proc)
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as exc:
        raise InputError("out", f"cannot write under {probe} ({exc.strerror or exc})") from None


#: config fields a resumed run must share with the run it continues (trials, timeouts and seed may change)
SAME_ON_RESUME = ("model", "data", "target", "budget", "space", "search.backend")


def _check_same_run(config: RunConfig, run_dir: Path, given: set[str]) -> None:
    """A resumed run must measure and search the same thing, or its old and new trials cannot be compared.

    The budget and space are the run's own: unless given again explicitly (``given``), they are taken from it.
    """
    saved = RunDir(run_dir).saved_config()
    if saved is None:
        return
    for key in ("budget", "space"):
        if key not in given and isinstance((saved or {}).get(key), str):
            setattr(config, key, saved[key])
    now = config.to_dict()
    for key in SAME_ON_RESUME:
        head, _, tail = key.partition(".")
        old = (saved or {}).get(head)
        new = now.get(head)
        if tail:
            old, new = (old or {}).get(tail), (new or {}).get(tail)
        if old != new:
            raise InputError(
                f"{config.source}.{key}",
                f"differs from the run being resumed in {run_dir} (was {old!r}, now {new!r}); use another --out",
            )


def _saved_baseline(run_dir: Path) -> dict[str, Any]:
    return RunDir(run_dir).saved_baseline(lambda data: Baseline.from_dict(data).to_dict())

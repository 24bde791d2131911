"""The run directory: the name of every file a search writes there, and the one place they are written and read.

A search, the solver, ``export`` and the report all go through :class:`RunDir`, so a file is named once and the
report can be rebuilt from the folder alone (it needs nothing from ``autocompress.search``)::

    config.yaml           the run's config, as resolved (a resumed run must match it)
    resolved_space.yaml   the searched parameters: name, technique, knob, layer, choices, identity
    baseline.yaml         the uncompressed model's costs and scores (the budget's reference)
    study.db              the Optuna storage of a one-process search (study STUDY_NAME)
    sensitivity.json      the solver's damages, solver.csv its seeds
    trials.csv            every trial (written when the search ends, or is interrupted)
    pareto.csv            the feasible front, with test scores (written last: its presence means "finished")
    phases.yaml           seconds spent per phase
    best_policy.yaml, best_model.pt, report.html, plots/, ray/
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

import pandas as pd
import yaml

from autocompress.errors import InputError, yaml_error_where
from autocompress.io import atomic_write_csv, atomic_write_text
from autocompress.record import COLUMNS as RECORD_COLUMNS

if TYPE_CHECKING:  # types only: the report reads a run directory without importing the search's dependencies
    from torch import nn

    from autocompress.policy import Policy
    from autocompress.space import ResolvedSpace

__all__ = ["RECORD_ATTR", "RunDir", "STUDY_NAME", "record_of", "rows_from_study"]

CONFIG = "config.yaml"
SPACE = "resolved_space.yaml"
BASELINE = "baseline.yaml"
STUDY = "study.db"
SENSITIVITY = "sensitivity.json"
SOLVER = "solver.csv"
TRIALS = "trials.csv"
PARETO = "pareto.csv"
PHASES = "phases.yaml"
BEST_POLICY = "best_policy.yaml"
BEST_MODEL = "best_model.pt"
REPORT = "report.html"
PLOTS = "plots"
RAY = "ray"

#: the study's name in study.db (and in a storage shared by workers)
STUDY_NAME = "autocompress"
#: any of these marks a folder as an autocompress run
RUN_FILES = (TRIALS, STUDY, CONFIG, BASELINE)
SPACE_FORMAT = "autocompress.resolved_space/1"

T = TypeVar("T")


@dataclass(frozen=True)
class RunDir:
    """One run directory. Writers raise on failure; the ``notes`` readers used by the report note what they could
    not read and go on, the others raise :class:`InputError` naming the file."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- paths ------------------------------------------------------------------------------------------------------
    @property
    def study(self) -> Path:
        return self.path / STUDY

    @property
    def study_url(self) -> str:
        return f"sqlite:///{self.study.resolve()}"

    @property
    def sensitivity(self) -> Path:
        return self.path / SENSITIVITY

    @property
    def best_model(self) -> Path:
        return self.path / BEST_MODEL

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    @property
    def ray(self) -> Path:
        return self.path / RAY

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES)

    def is_finished(self) -> bool:
        """``pareto.csv`` is written last when a search ends (an interrupted one writes only ``trials.csv``)."""
        return self.has(TRIALS) and self.has(PARETO)

    # -- writers ----------------------------------------------------------------------------------------------------
    def write_start(self, config: Mapping[str, Any], baseline: Mapping[str, Any], space: ResolvedSpace) -> None:
        """What a search knows before its first trial: config, baseline and the resolved space."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        self.write_baseline(baseline)
        self.write_space(space)

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(dict(config), sort_keys=False))

    def write_baseline(self, baseline: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / BASELINE, yaml.safe_dump(dict(baseline), sort_keys=False))

    def write_space(self, space: ResolvedSpace) -> None:
        dims = [{"name": d.name, "technique": d.technique, "knob": d.knob, "layer": d.layer,
                 "choices": list(d.choices), "identity": d.identity} for d in space.dimensions]
        atomic_write_text(self.path / SPACE, yaml.safe_dump({"format": SPACE_FORMAT, "dimensions": dims},
                                                            sort_keys=False))

    def write_trials(self, frame: pd.DataFrame) -> None:
        atomic_write_csv(self.path / TRIALS, frame)

    def write_results(self, trials: pd.DataFrame, pareto: pd.DataFrame, baseline: Mapping[str, Any],
                      best_policy: Policy | None) -> None:
        """A finished search: trials, then the front (whose presence marks the run finished), the baseline with its
        test score, and the best policy; a stale best policy is removed."""
        self.write_trials(trials)
        atomic_write_csv(self.path / PARETO, pareto)
        self.write_baseline(baseline)
        if best_policy is not None:
            atomic_write_text(self.path / BEST_POLICY, best_policy.to_yaml())
        elif (self.path / BEST_POLICY).exists():
            os.unlink(self.path / BEST_POLICY)

    def write_best_model(self, model: nn.Module, policy: Policy, model_name: str,
                         model_kwargs: Mapping[str, Any]) -> None:
        from autocompress.compose import save_compressed  # torch and the techniques: the report never needs them

        save_compressed(self.best_model, model, policy, model_name, dict(model_kwargs))

    def write_phases(self, phases: Mapping[str, float]) -> None:
        atomic_write_text(self.path / PHASES, yaml.safe_dump(
            {name: round(seconds, 1) for name, seconds in phases.items()}, sort_keys=False))

    def write_solver(self, frame: pd.DataFrame) -> None:
        atomic_write_csv(self.path / SOLVER, frame)

    # -- readers that raise (a resumed search) ----------------------------------------------------------------------
    def saved_config(self) -> dict[str, Any] | None:
        """The saved config as a dict, or None when there is none."""
        path = self.path / CONFIG
        try:
            return yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            why = yaml_error_where(exc) if isinstance(exc, yaml.YAMLError) else str(exc)
            raise InputError(str(path), f"cannot read the saved config ({why})") from None

    def saved_baseline(self, parse: Callable[[Any], T]) -> T:
        """``parse`` of the saved ``baseline.yaml``; a missing file, bad YAML or a field ``parse`` rejects
        (KeyError, TypeError, ValueError, AttributeError) is one :class:`InputError` naming the file."""
        path = self.path / BASELINE
        try:
            return parse(yaml.safe_load(path.read_text()) or {})
        except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
            why = yaml_error_where(exc) if isinstance(exc, yaml.YAMLError) else f"{type(exc).__name__}: {exc}"
            raise InputError(str(path), f"cannot read the saved baseline ({why})") from None

    # -- readers that note and go on (the report) -------------------------------------------------------------------
    def read_yaml(self, name: str, notes: list[str]) -> Any:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            notes.append(f"{path.name} could not be read ({type(exc).__name__}); left out")
            return None

    def read_csv(self, name: str, notes: list[str]) -> pd.DataFrame | None:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return pd.read_csv(path)
        except pd.errors.EmptyDataError:
            return pd.DataFrame(columns=RECORD_COLUMNS)
        except (OSError, ValueError) as exc:
            notes.append(f"{path.name} could not be read ({exc}); left out")
            return None

    def read_identities(self, notes: list[str]) -> dict[str, Any] | None:
        """Parameter name -> the value that leaves its layer as it is, from the saved resolved space (None for a run
        written before the space was saved)."""
        data = self.read_yaml(SPACE, notes)
        if not isinstance(data, dict) or not isinstance(data.get("dimensions"), list):
            return None
        return {str(d["name"]): d.get("identity") for d in data["dimensions"] if isinstance(d, dict) and "name" in d}

    def read_study(self, notes: list[str]) -> tuple[list[dict[str, Any]] | None, int]:
        """Finished trial rows in ``study.db`` and how many trials are running, or ``(None, 0)``."""
        if not self.study.is_file():
            return None, 0
        try:
            import optuna  # only a run still in progress needs it

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(study_name=STUDY_NAME, storage=self.study_url)
            running = sum(t.state.name == "RUNNING" and not t.user_attrs.get("interrupted")
                          for t in study.get_trials(deepcopy=False))
            return rows_from_study(study), running
        except Exception as exc:  # a broken or foreign database must not stop the report
            notes.append(f"{STUDY} could not be read ({type(exc).__name__}: {exc})")
            return None, 0


#: the user attribute holding a finished trial's whole record (TrialRecord.to_dict): one storage write per trial
RECORD_ATTR = "record"


def record_of(trial: Any) -> dict[str, Any]:
    """The record an Optuna trial was told with (``{}`` before it finished); a study written with one user
    attribute per field (before records were stored whole) reads the same, so older runs resume and report."""
    record = trial.user_attrs.get(RECORD_ATTR)
    if isinstance(record, dict):
        return dict(record)
    return {k: v for k, v in trial.user_attrs.items() if k not in ("interrupted", "surplus")}


def rows_from_study(study: Any) -> list[dict[str, Any]]:
    """The trial rows an Optuna study holds (each finished trial's record, number, state and parameters), leaving
    out trials still running or waiting, interrupted ones and a shared study's surplus."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("interrupted") or t.user_attrs.get("surplus") or t.state.name in ("RUNNING", "WAITING"):
            continue
        row = record_of(t)
        row["number"] = t.number
        row["state"] = t.state.name
        for key in ("val_accuracy", "latency_ms", "memory_mb"):
            if row.get(key) is None:
                row[key] = math.nan
        row.update(t.params)
        rows.append(row)
    return rows

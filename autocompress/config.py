"""The run configuration: one YAML file names the model, the data, the target, the budget and the space.

Every key is checked against the schema below (pydantic dataclasses: the types, ranges and names each field takes);
a wrong one fails with an error naming it (``config.target.threads: must be at least 1, got 0``), through
:mod:`autocompress.schema`. Relative paths are taken relative to the config file, so a config can be run from
anywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Mapping

import yaml
from pydantic import AfterValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter
from pydantic import model_validator
from pydantic.dataclasses import dataclass

from autocompress import schema
from autocompress.errors import InputError, yaml_error_where
from autocompress.schema import Rule, one_of

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
STRATEGIES = ("solve", "sample")
#: search.objective -> the early-stopping rules it supports (auto: successive_halving for single, median for multi)
PRUNERS = {
    "multi": ("auto", "none", "median"),
    "single": ("auto", "none", "median", "successive_halving", "hyperband"),
}

_SCHEMA = ConfigDict(extra="forbid")
AtLeastOne = Annotated[StrictInt, Field(ge=1)]


def _seconds(value: float) -> float:
    if not value > 0:  # also catches NaN
        raise Rule(f"must be a number of seconds above 0, got {value!r}")
    return value


Seconds = Annotated[StrictFloat, AfterValidator(_seconds)]


def _sensitivity_methods() -> tuple[str, ...]:
    from autocompress.sensitivity import METHODS  # torch: imported when a config is checked, not with autocompress

    return METHODS


def _auto_or(rule: str, ok) -> AfterValidator:
    """``auto``, or a value ``ok`` accepts."""

    def check(value: Any) -> Any:
        if value == "auto" and isinstance(value, str):
            return value
        if not ok(value):
            raise Rule(f"{rule}, got {value!r}")
        return value

    return AfterValidator(check)


def _number(value: Any, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)


def _fractions(value: Any) -> Any:
    if (not isinstance(value, list) or not value
            or not all(_number(f, (int, float)) and 0 < f <= 1 for f in value)):
        raise Rule(f"must be a list of fractions of the limit in (0, 1], got {value!r}")
    return value


@dataclass(config=_SCHEMA)
class ModelConfig:
    name: StrictStr = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: StrictStr | None = None  # local file: .pt/.pth (loaded with weights_only=True) or .safetensors
    train_if_missing: dict[str, Any] | None = None  # {epochs, lr, batch_size}: train the base once and cache it


@dataclass(config=_SCHEMA)
class DataConfig:
    kind: Annotated[StrictStr, one_of("data kind", ("fashion_mnist", "image_folder"))] = "fashion_mnist"
    path: StrictStr = DEFAULT_FASHION_MNIST
    val_size: AtLeastOne = 5000  # carved from the training split, seeded
    calibration_size: StrictInt = 512  # training images for calibration (activation-aware ranks, importance)
    train_subset: StrictInt = 10000  # training images for recovery training
    image_size: StrictInt = 28  # image_folder only
    channels: StrictInt = 1  # image_folder only
    seed: StrictInt = 0


@dataclass(config=_SCHEMA)
class TargetConfig:
    threads: AtLeastOne = 2
    batch_size: AtLeastOne = 256
    warmup: Annotated[StrictInt, Field(ge=0)] = 3
    repeats: AtLeastOne = 10
    # time each candidate in the same rounds as the uncompressed model and report baseline x their ratio, so load
    # that drifts during a run hits both alike (twice the timing work); false: the candidate's own median
    paired: StrictBool = True
    # where the model will run, and so where every candidate is timed (autocompress/runtime.py): torch (eager), or a
    # registered runtime such as onnxruntime or openvino (pip install 'autocompress[onnx]' / '[openvino]')
    runtime: StrictStr = "torch"


@dataclass(config=_SCHEMA)
class SearchConfig:
    trials: AtLeastOne = 40
    sampler: Annotated[StrictStr, one_of("sampler", ("tpe", "nsga2", "random"))] = "tpe"
    seed: StrictInt = 0
    backend: StrictStr = "optuna"
    timeout_s: Seconds | None = None
    trial_timeout_s: Seconds | None = None
    # solve (default): profile the per-layer latency table, score each choice's damage, solve for the budget and
    # start from the solver's policies (autocompress/seeding.py); sample: start from the uniform baselines and let the
    # sampler find its way (the search before the solver)
    strategy: Annotated[StrictStr, one_of("strategy", STRATEGIES)] = "solve"
    # of the limit, one seed each
    solver_fractions: Annotated[Any, AfterValidator(_fractions)] = field(default_factory=lambda: [0.75, 0.85, 0.95, 1.0])
    # how the solver scores each choice's damage (autocompress/sensitivity.py): kl (a forward pass per setting), fisher
    # (the Fisher-weighted error of the setting's block alone, far cheaper on big models), or auto: kl when its
    # projected time fits sensitivity_seconds, else fisher on as many calibration images as fit
    sensitivity: Annotated[StrictStr, one_of("method", _sensitivity_methods)] = "auto"
    sensitivity_seconds: Seconds = 180.0
    # later waves of two seeds each (the next best policies, the limit corrected by what the earlier seeds measured)
    solver_waves: Annotated[StrictInt, Field(ge=0)] = 3
    # the uniform single-technique policies (every layer int8, rank 0.5 everywhere, ...) as trials: true/false, or
    # auto: spent as trials with strategy sample, not with solve (the solver's seeds start the search instead)
    baselines: Annotated[Any, _auto_or("must be true, false or auto", lambda v: isinstance(v, bool))] = "auto"
    # after the search, the chosen policy is trained back for this many recovery steps (early stopped on the
    # validation probe) and only then scored on the test split; auto: 1500 with strategy solve, 0 with sample (one
    # policy at 0.3x on the demo, AMX Xeon: validation 0.849 after 600 steps, 0.861 after 1500, still rising)
    finalize_steps: Annotated[Any, _auto_or("must be a whole number of steps (0: off) or auto",
                                            lambda v: _number(v, int) and v >= 0)] = "auto"
    finalize_top: AtLeastOne = 1  # how many of the Pareto front, best first, are finalized
    # multi: maximize accuracy and minimize the budgeted cost (Pareto front); single: maximize accuracy only, the
    # budget staying a constraint -- the mode in which Optuna's pruners work (see autocompress/search/early_stopping.py)
    objective: Annotated[StrictStr, one_of("objective", PRUNERS)] = "multi"
    pruner: StrictStr = "auto"  # early stopping of training trials: auto | none | median | successive_halving | hyperband
    # latency budgets: predict each candidate's latency from the per-layer table (`autocompress profile`, cached per
    # machine, torch, model and target) and skip it, without compressing or evaluating it, when the prediction is
    # over latency_model_margin x the budget; every evaluated candidate is still measured end to end.
    # Off by default: a table profiled while the machine was busy mis-predicts every later run (seen here: uniform
    # bf16 predicted 2x slower than fp32, measured faster), and nothing yet detects a stale table.
    latency_model: StrictBool = False
    # auto: 1.1 with strategy solve (the table is checked against this machine first: in two AVX2 demo runs its
    # predictions of the sampler's trials were off by 2.3-2.5% (median), 11% at most, and all 12 sampler trials
    # predicted 1.1-1.3x the limit were compressed, timed and measured over it), 1.3 with sample
    latency_model_margin: Annotated[Any, _auto_or(
        "must be auto or at least 1.0 (a candidate is skipped when predicted over margin x the budget)",
        lambda v: _number(v, (int, float)) and v >= 1.0)] = "auto"  # >= also rejects NaN
    latency_table: StrictStr | None = None  # the table file; default: in the user cache ($AUTOCOMPRESS_CACHE_DIR)
    # latency budgets: choices measured slower than the uncompressed model on this machine (bf16 on a CPU with AVX2
    # alone) are left out of the search and logged; true keeps them (see autocompress/screening.py)
    keep_slow_choices: StrictBool = False
    # the score maximized on the validation split, by name: accuracy (builtin) or a metric a plugin registers
    # (autocompress_register_metrics); a function given to autocompress.search(metric=...) takes its place
    metric: StrictStr = "accuracy"

    @model_validator(mode="after")
    def _pruner_fits_objective(self) -> "SearchConfig":
        if self.pruner not in PRUNERS[self.objective]:
            known = ", ".join(PRUNERS[self.objective])
            hint = " (Optuna's pruners need search.objective: single)" if self.pruner in PRUNERS["single"] else ""
            raise Rule(f"{self.pruner!r} is not one of: {known}{hint}", key="pruner")
        return self


def measured_baselines(search: SearchConfig) -> bool:
    """Whether the uniform baselines are spent as trials (``search.baselines``, ``auto`` by strategy)."""
    return search.strategy == "sample" if search.baselines == "auto" else bool(search.baselines)


def latency_model_margin(search: SearchConfig) -> float:
    """How far over the latency limit a candidate may be predicted and still be measured
    (``search.latency_model_margin``, ``auto`` by strategy)."""
    if search.latency_model_margin == "auto":
        return 1.1 if search.strategy == "solve" else 1.3
    return float(search.latency_model_margin)


def finalize_steps(search: SearchConfig) -> int:
    """Recovery steps for the chosen policy after the search (``search.finalize_steps``, ``auto`` by strategy)."""
    if search.finalize_steps == "auto":
        return 1500 if search.strategy == "solve" else 0
    return int(search.finalize_steps)


@dataclass(config=_SCHEMA)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    budget: StrictStr = "latency=0.5x"
    space: StrictStr = "vit"
    out: StrictStr = "runs/latest"
    plugins: dict[Annotated[StrictStr, one_of("key", ("block",))], list[StrictStr]] = field(default_factory=dict)
    source: StrictStr = "config"  # where it came from, for messages (not a key of the file)
    base_dir: StrictStr = "."  # relative paths are resolved against this (not a key of the file)

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        data.pop("base_dir")
        return data


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "target": TargetConfig, "search": SearchConfig}
_FILE_KEYS = ("model", "data", "target", "search", "budget", "space", "out", "plugins")  # what a config file may say
_RUN_CONFIG = TypeAdapter(RunConfig)
_MESSAGES = {"plugins": "must be a mapping with 'block: [names]'"}


def _keys(loc: tuple) -> list[str]:
    """The keys a config file may have at ``loc`` (named when a key there is unknown)."""
    if not loc:
        return list(_FILE_KEYS)
    section = _SECTIONS.get(loc[0])
    return [f.name for f in dataclasses.fields(section)] if section and len(loc) == 1 else []


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(str(path), f"cannot read config ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise InputError(str(path), "not a text file (expected a YAML config)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(str(path), f"not valid YAML ({yaml_error_where(exc)})") from None
    if not isinstance(data, Mapping):
        raise InputError(str(path), "a config must be a YAML mapping (model:, data:, budget: ...)")
    config = config_from_dict(data, source="config", base_dir=path.resolve().parent)
    for key, value in (overrides or {}).items():
        set_dotted(config, key, value)
    validate(config)
    return config


def config_from_dict(data: Any, source: str = "config", base_dir: str | Path = ".") -> RunConfig:
    """The config a mapping describes (a parsed YAML file, or a dict from Python), every key and value checked."""
    if not isinstance(data, Mapping):
        raise InputError(source, "a config must be a YAML mapping")
    for key in data:
        if key not in _FILE_KEYS:
            raise InputError(f"{source}.{key}", schema.unknown_key(_FILE_KEYS))
    return schema.check(_RUN_CONFIG, {**data, "source": source, "base_dir": str(base_dir)}, source, _MESSAGES, _keys)


def set_dotted(config: RunConfig, key: str, value: Any) -> None:
    """Apply a command-line override such as ``search.trials=10`` (its value is checked with the rest by
    :func:`validate`)."""
    head, _, tail = key.partition(".")
    if tail and head in _SECTIONS:
        if tail not in _keys((head,)):
            raise InputError(f"{config.source}.{key}", schema.unknown_key(_keys((head,))))
        setattr(getattr(config, head), tail, value)
    elif not tail and head in ("budget", "space", "out"):
        setattr(config, head, value)
    else:
        settable = ["budget", "space", "out", *(f"{section}.<key>" for section in _SECTIONS)]
        raise InputError(f"{config.source}.{key}", schema.unknown_key(settable))


def validate(config: RunConfig) -> None:
    """Check the whole config again, as it is now (values set from Python or the command line after it was read
    are checked like the file's), and what the schema cannot say: a model is named, the budget reads."""
    src = config.source
    checked = schema.check(_RUN_CONFIG, dataclasses.asdict(config), src, _MESSAGES, _keys)
    for name in _SECTIONS:  # the checked values, as the schema gives them (an int given for a float is a float)
        setattr(config, name, getattr(checked, name))
    if not config.model.name:
        raise InputError(f"{src}.model.name", "a timm model name is required")
    from autocompress.budget import Budget  # local: budget parsing owns its messages

    # its form only: which words name a cost is known once the plugins are loaded (runner.prepare parses it)
    Budget.read(config.budget, field=f"{src}.budget")

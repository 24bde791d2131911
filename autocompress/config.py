"""The run configuration: one YAML file names the model, the data, the target, the budget and the space.

Every key is checked; a wrong one fails with an error naming it (``config.target.threads: must be ...``). Relative
paths are taken relative to the config file, so a config can be run from anywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from autocompress.errors import InputError, yaml_error_where

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
STRATEGIES = ("solve", "sample")
#: search.objective -> the early-stopping rules it supports (auto: successive_halving for single, median for multi)
PRUNERS = {
    "multi": ("auto", "none", "median"),
    "single": ("auto", "none", "median", "successive_halving", "hyperband"),
}


@dataclass
class ModelConfig:
    name: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # local file: .pt/.pth (loaded with weights_only=True) or .safetensors
    train_if_missing: dict[str, Any] | None = None  # {epochs, lr, batch_size}: train the base once and cache it


@dataclass
class DataConfig:
    kind: str = "fashion_mnist"  # fashion_mnist | image_folder
    path: str = DEFAULT_FASHION_MNIST
    val_size: int = 5000  # carved from the training split, seeded
    calibration_size: int = 512  # training images for calibration (activation-aware ranks, importance)
    train_subset: int = 10000  # training images for recovery training
    image_size: int = 28  # image_folder only
    channels: int = 1  # image_folder only
    seed: int = 0


@dataclass
class TargetConfig:
    threads: int = 2
    batch_size: int = 256
    warmup: int = 3
    repeats: int = 10
    # time each candidate in the same rounds as the uncompressed model and report baseline x their ratio, so load
    # that drifts during a run hits both alike (twice the timing work); false: the candidate's own median
    paired: bool = True
    # where the model will run, and so where every candidate is timed (autocompress/runtime.py): torch (eager), or a
    # registered runtime such as onnxruntime or openvino (pip install 'autocompress[onnx]' / '[openvino]')
    runtime: str = "torch"


@dataclass
class SearchConfig:
    trials: int = 40
    sampler: str = "tpe"  # tpe | nsga2 | random
    seed: int = 0
    backend: str = "optuna"
    timeout_s: float | None = None
    trial_timeout_s: float | None = None
    # solve (default): profile the per-layer latency table, score each choice's damage, solve for the budget and
    # start from the solver's policies (autocompress/seeding.py); sample: start from the uniform baselines and let the
    # sampler find its way (the search before the solver)
    strategy: str = "solve"
    solver_fractions: list = field(default_factory=lambda: [0.75, 0.85, 0.95, 1.0])  # of the limit, one seed each
    # how the solver scores each choice's damage (autocompress/sensitivity.py): kl (a forward pass per setting), fisher
    # (the Fisher-weighted error of the setting's block alone, far cheaper on big models), or auto: kl when its
    # projected time fits sensitivity_seconds, else fisher on as many calibration images as fit
    sensitivity: str = "auto"
    sensitivity_seconds: float = 180.0
    # later waves of two seeds each (the next best policies, the limit corrected by what the earlier seeds measured)
    solver_waves: int = 3
    # the uniform single-technique policies (every layer int8, rank 0.5 everywhere, ...) as trials: true/false, or
    # auto: spent as trials with strategy sample, not with solve (the solver's seeds start the search instead)
    baselines: Any = "auto"
    # after the search, the chosen policy is trained back for this many recovery steps (early stopped on the
    # validation probe) and only then scored on the test split; auto: 600 with strategy solve, 0 with sample
    finalize_steps: Any = "auto"
    finalize_top: int = 1  # how many of the Pareto front, best first, are finalized
    # multi: maximize accuracy and minimize the budgeted cost (Pareto front); single: maximize accuracy only, the
    # budget staying a constraint -- the mode in which Optuna's pruners work (see autocompress/search/early_stopping.py)
    objective: str = "multi"
    pruner: str = "auto"  # early stopping of training trials: auto | none | median | successive_halving | hyperband
    # latency budgets: predict each candidate's latency from the per-layer table (`autocompress profile`, cached per
    # machine, torch, model and target) and skip it, without compressing or evaluating it, when the prediction is
    # over latency_model_margin x the budget; every evaluated candidate is still measured end to end.
    # Off by default: a table profiled while the machine was busy mis-predicts every later run (seen here: uniform
    # bf16 predicted 2x slower than fp32, measured faster), and nothing yet detects a stale table.
    latency_model: bool = False
    # auto: 1.1 with strategy solve (the table is checked against this machine first: in two AVX2 demo runs its
    # predictions of the sampler's trials were off by 2.3-2.5% (median), 11% at most, and all 12 sampler trials
    # predicted 1.1-1.3x the limit were compressed, timed and measured over it), 1.3 with sample
    latency_model_margin: Any = "auto"
    latency_table: str | None = None  # the table file; default: in the user cache ($AUTOCOMPRESS_CACHE_DIR)
    # latency budgets: choices measured slower than the uncompressed model on this machine (bf16 on a CPU with AVX2
    # alone) are left out of the search and logged; true keeps them (see autocompress/screening.py)
    keep_slow_choices: bool = False
    # the score maximized on the validation split, by name: accuracy (builtin) or a metric a plugin registers
    # (autocompress_register_metrics); a function given to autocompress.search(metric=...) takes its place
    metric: str = "accuracy"


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
        return 600 if search.strategy == "solve" else 0
    return int(search.finalize_steps)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    budget: str = "latency=0.5x"
    space: str = "vit"
    out: str = "runs/latest"
    plugins: dict[str, Any] = field(default_factory=dict)  # {block: [names]}
    source: str = "config"  # where it came from, for messages
    base_dir: str = "."  # relative paths are resolved against this

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        data.pop("base_dir")
        return data


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "target": TargetConfig, "search": SearchConfig}


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
    if not isinstance(data, Mapping):
        raise InputError(source, "a config must be a YAML mapping")
    config = RunConfig(source=source, base_dir=str(base_dir))
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise InputError(f"{source}.{key}", "must be a mapping")
            section = getattr(config, key)
            names = {f.name: f for f in dataclasses.fields(section)}
            for sub, sub_value in value.items():
                if sub not in names:
                    raise InputError(f"{source}.{key}.{sub}", f"unknown key (expected one of: {', '.join(names)})")
                setattr(section, sub, _coerce(sub_value, names[sub], f"{source}.{key}.{sub}"))
        elif key in ("budget", "space", "out"):
            if not isinstance(value, str):
                raise InputError(f"{source}.{key}", "must be a string")
            setattr(config, key, value)
        elif key == "plugins":
            if not isinstance(value, Mapping) or set(value) - {"block"}:
                raise InputError(f"{source}.plugins", "must be a mapping with 'block: [names]'")
            config.plugins = dict(value)
        else:
            raise InputError(
                f"{source}.{key}",
                "unknown key (expected: model, data, target, search, budget, space, out, plugins)",
            )
    return config


def set_dotted(config: RunConfig, key: str, value: Any) -> None:
    """Apply a command-line override such as ``search.trials=10``."""
    head, _, tail = key.partition(".")
    if tail and head in _SECTIONS:
        section = getattr(config, head)
        names = {f.name: f for f in dataclasses.fields(section)}
        if tail not in names:
            raise InputError(f"{config.source}.{key}", "unknown key")
        setattr(section, tail, _coerce(value, names[tail], f"{config.source}.{key}"))
    elif not tail and head in ("budget", "space", "out"):
        setattr(config, head, value)
    else:
        raise InputError(f"{config.source}.{key}", "unknown key")


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        if "None" in kind:
            return None
        raise InputError(where, "must not be empty")
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(where, f"must be an integer, got {value!r}")
        return value
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(where, f"must be a number, got {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise InputError(where, f"must be true or false, got {value!r}")
        return value
    if kind.startswith("str"):
        if not isinstance(value, str):
            raise InputError(where, f"must be a string, got {value!r}")
        return value
    if kind.startswith("dict"):
        if not isinstance(value, Mapping):
            raise InputError(where, "must be a mapping")
        return dict(value)
    return value


def validate(config: RunConfig) -> None:
    """Check values that are well-typed but impossible."""
    src = config.source
    if not config.model.name:
        raise InputError(f"{src}.model.name", "a timm model name is required")
    positive = {
        "target.threads": config.target.threads,
        "target.batch_size": config.target.batch_size,
        "target.repeats": config.target.repeats,
        "search.trials": config.search.trials,
        "data.val_size": config.data.val_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise InputError(f"{src}.{key}", f"must be at least 1, got {value}")
    if config.target.warmup < 0:
        raise InputError(f"{src}.target.warmup", "must be 0 or more")
    for key in ("timeout_s", "trial_timeout_s"):
        value = getattr(config.search, key)
        if value is not None and not value > 0:  # also catches NaN
            raise InputError(f"{src}.search.{key}", f"must be a positive number of seconds, got {value}")
    if config.search.objective not in PRUNERS:
        raise InputError(f"{src}.search.objective", f"unknown objective {config.search.objective!r} (multi, single)")
    if config.search.pruner not in PRUNERS[config.search.objective]:
        known = ", ".join(PRUNERS[config.search.objective])
        hint = " (Optuna's pruners need search.objective: single)" if config.search.pruner in PRUNERS["single"] else ""
        raise InputError(f"{src}.search.pruner", f"{config.search.pruner!r} is not one of: {known}{hint}")
    margin = config.search.latency_model_margin
    if margin != "auto" and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                             or not margin >= 1.0):  # also catches NaN
        raise InputError(f"{src}.search.latency_model_margin",
                         f"must be auto or at least 1.0 (a candidate is skipped when predicted over margin x the "
                         f"budget), got {config.search.latency_model_margin}")
    if config.search.strategy not in STRATEGIES:
        raise InputError(f"{src}.search.strategy", f"unknown strategy {config.search.strategy!r} ({', '.join(STRATEGIES)})")
    if config.search.baselines not in (True, False, "auto"):
        raise InputError(f"{src}.search.baselines", f"must be true, false or auto, got {config.search.baselines!r}")
    steps = config.search.finalize_steps
    if steps != "auto" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise InputError(f"{src}.search.finalize_steps", f"must be a whole number of steps (0: off) or auto, got {steps!r}")
    fractions = config.search.solver_fractions
    if (not isinstance(fractions, list) or not fractions
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in fractions)):
        raise InputError(f"{src}.search.solver_fractions", f"must be a list of fractions of the limit in (0, 1], got {fractions!r}")
    from autocompress.sensitivity import METHODS

    if config.search.sensitivity not in METHODS:
        raise InputError(f"{src}.search.sensitivity", f"unknown method {config.search.sensitivity!r} ({', '.join(METHODS)})")
    seconds = config.search.sensitivity_seconds
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise InputError(f"{src}.search.sensitivity_seconds", f"must be a number of seconds above 0, got {seconds!r}")
    if config.search.solver_waves < 0:
        raise InputError(f"{src}.search.solver_waves", f"must be 0 or more, got {config.search.solver_waves}")
    if config.search.finalize_top < 1:
        raise InputError(f"{src}.search.finalize_top", f"must be at least 1, got {config.search.finalize_top}")
    if config.search.sampler not in ("tpe", "nsga2", "random"):
        raise InputError(f"{src}.search.sampler", f"unknown sampler {config.search.sampler!r} (tpe, nsga2, random)")
    if config.data.kind not in ("fashion_mnist", "image_folder"):
        raise InputError(f"{src}.data.kind", f"unknown data kind {config.data.kind!r} (fashion_mnist, image_folder)")
    from autocompress.budget import Budget  # local: budget parsing owns its messages

    # its form only: which words name a cost is known once the plugins are loaded (runner.prepare parses it)
    Budget.read(config.budget, field=f"{src}.budget")



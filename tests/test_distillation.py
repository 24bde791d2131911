"""The distillation plugin: recovery training that recovers real accuracy in bounded steps, teacher outputs computed
once per run, early stopping recorded as PRUNED (multi- and single-objective), policies that round-trip and compressed
models that reload."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

import autocompress
import autocompress_distillation.teacher as teacher_module
import autocompress_distillation.technique as technique_module
import autocompress_distillation.train as train_module
from autocompress.compose import load_compressed, save_compressed
from autocompress.config import config_from_dict
from autocompress.errors import InputError
from autocompress.evaluate import accuracy
from autocompress.pluginmanager import load_plugins
from autocompress.policy import Policy
from autocompress.runner import TrialReport, evaluate_params, prepare
from autocompress.search import finish_run
from autocompress.search.early_stopping import MedianRule
from autocompress.search.optuna_backend import OptunaBackend
from autocompress.search.study import open_study, record_of
from autocompress.technique import Stage, Technique, TechniqueSettings, TrialStopped
from autocompress_distillation.train import report_steps
from autocompress.testing import TechniquePlugin

DAMAGE = 0.9  # fraction of every block's MLP hidden channels zeroed: a heavy structural cut


class ChannelZeroing(Technique):
    """Test-only structural damage: zero the lowest-L1 fraction of each block's MLP hidden channels (pruning without
    the surgery), so that there is accuracy to recover. Registered through the same hook as any plugin."""

    name = "zeroing"
    stage = Stage.STRUCTURE
    global_knobs = {"fraction": 0.0}

    def candidate_layers(self, model: nn.Module) -> list[str]:
        return []

    def apply(self, model, settings, ctx):
        fraction = settings.options.get("fraction", 0.0)
        for block in model.blocks:
            fc1, fc2 = block.mlp.fc1, block.mlp.fc2
            drop = fc1.weight.abs().sum(1).argsort()[: int(fc1.out_features * fraction)]
            with torch.no_grad():
                fc1.weight[drop] = 0
                fc1.bias[drop] = 0
                fc2.weight[:, drop] = 0
        return model


@pytest.fixture(scope="module")
def test_plugins():
    plugins = load_plugins(extra=[TechniquePlugin("damage", ChannelZeroing())])
    assert {"distillation", "quantization", "zeroing"} <= set(plugins.techniques)
    return plugins


def write_space(tmp_path, steps=(5, 10), lr=(1e-3, 0.3), batch_size=(32,)) -> str:
    """A space whose trials all damage the model and format it in bf16 (half the memory), distilling or not."""
    space = {"techniques": {
        "zeroing": {"options": {"fraction": [DAMAGE]}},
        "quantization": {"layers": [{"match": "re:blocks\\.\\d+\\..*|head", "format": ["bf16"]}]},
        "distillation": {"options": {"steps": list(steps), "lr": list(lr), "batch_size": list(batch_size)}},
    }}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def run_context(tiny_config, tmp_path, plugins, trained_tiny, fmnist, **search):
    config = dict(tiny_config, space=write_space(tmp_path), budget="memory=0.8x")
    config["target"] = {**config["target"], "warmup": 1, "repeats": 3}
    config["search"] = {**config["search"], **search}
    model, _ = trained_tiny
    return prepare(config_from_dict(config), plugins=plugins, model=model, data=fmnist, log=lambda _: None)


def params_for(run, **options) -> dict:
    """Trial parameters: every layer bf16, the MLP damage on, distillation options as given."""
    params = {d.name: d.choices[-1] for d in run.space.dimensions if d.technique != "distillation"}
    for d in run.space.dimensions:
        if d.technique == "distillation":
            params[d.name] = options.get(d.knob, d.identity)
    return params


# --- the technique ------------------------------------------------------------------------------------------------


def test_distillation_is_a_recovery_stage_plugin_with_global_options_only(plugins):
    technique = plugins.techniques["distillation"]
    assert plugins.owners["distillation"] == "distillation"
    assert technique.stage == Stage.RECOVERY
    assert Stage.FACTORIZATION < technique.stage < Stage.FORMAT
    assert technique.layer_knobs == {} and next(iter(technique.global_knobs)) == "steps"
    assert technique.global_knobs["steps"] == 0
    assert report_steps(200) == [25, 50, 100, 200] and report_steps(60) == [25, 50, 60] and report_steps(0) == []


def test_distillation_recovers_accuracy_of_a_damaged_vit_in_bounded_steps(fmnist, trained_tiny, test_plugins):
    teacher, _ = trained_tiny
    from autocompress.compose import apply_policy
    from autocompress.config import RunConfig
    from autocompress.runner import make_apply_context

    config = RunConfig()
    config.data.train_subset = 2000
    damage = TechniqueSettings(options={"fraction": DAMAGE})
    plain = Policy(techniques={"zeroing": damage})
    distilled = Policy(techniques={"zeroing": damage,
                                   "distillation": TechniqueSettings(options={"steps": 50, "batch_size": 64})})
    reports: list[tuple[int, float]] = []
    ctx = make_apply_context(config, teacher, fmnist, seed=0, report=lambda s, v: reports.append((s, v)) and False)
    damaged = apply_policy(teacher, plain, test_plugins.techniques, ctx)
    recovered = apply_policy(teacher, distilled, test_plugins.techniques, ctx)

    acc_teacher = accuracy(teacher, fmnist.val)
    acc_damaged, acc_recovered = accuracy(damaged, fmnist.val), accuracy(recovered, fmnist.val)
    assert acc_damaged < acc_teacher - 0.05, "the damage must cost accuracy for the test to mean anything"
    assert acc_recovered >= acc_damaged + 0.05, (acc_damaged, acc_recovered)
    # bounded: exactly the probes at 25 and 50 steps were reported, and the last one is the returned model's score
    assert [s for s, _ in reports] == [25, 50]
    assert reports[-1][1] == pytest.approx(accuracy(recovered, fmnist.val.head(2000)))
    # pruned channels stay pruned: training moved the surviving weights only
    for before, after in zip(damaged.blocks, recovered.blocks):
        dropped = (before.mlp.fc1.weight == 0).all(1)
        assert int(dropped.sum()) == int(DAMAGE * before.mlp.fc1.out_features)
        assert bool((after.mlp.fc1.weight[dropped] == 0).all())
        assert not torch.equal(after.mlp.fc1.weight[~dropped], before.mlp.fc1.weight[~dropped])
    assert teacher.training is False


def test_teacher_outputs_are_computed_once_per_run_and_trained_weights_are_reused(
    tiny_config, tmp_path, trained_tiny, fmnist, test_plugins, monkeypatch
):
    run = run_context(tiny_config, tmp_path, test_plugins, trained_tiny, fmnist)
    teacher_passes, trainings = [], []
    compute, distill = teacher_module.compute_teacher_outputs, technique_module.distill
    monkeypatch.setattr(teacher_module, "compute_teacher_outputs",
                        lambda *a, **k: teacher_passes.append(1) or compute(*a, **k))
    monkeypatch.setattr(technique_module, "distill", lambda *a, **k: trainings.append(1) or distill(*a, **k))

    params = params_for(run, steps=10, batch_size=32)
    records = [evaluate_params(run, params, number) for number in (0, 1, 0)]  # the last repeats trial 0 (same seed)
    assert [r["state"] for r in records] == ["COMPLETE"] * 3, [r["error"] for r in records]
    assert len(teacher_passes) == 1, "the teacher ran more than once in one run"
    # trial 0 and trial 1 differ by seed, so both train; the repeat of trial 0 loads its trained weights
    assert len(trainings) == 2
    assert records[2]["val_accuracy"] == records[0]["val_accuracy"]
    targets = teacher_module.teacher_targets(run.model, run.data.train.images[:2000], run.cache)
    assert len(teacher_passes) == 1 and targets.logits.shape == (2000, 10)


@pytest.fixture
def early_reports(monkeypatch):
    """Probe reports from step 5 on (not 25), so that search trials stay cheap: the mechanism is what is tested."""
    monkeypatch.setattr(train_module, "FIRST_REPORT", 5)
    assert report_steps(10) == [5, 10]


def test_early_stopped_trials_are_recorded_as_pruned_in_trials_csv(
    tiny_config, tmp_path, trained_tiny, fmnist, test_plugins, early_reports
):
    """Multi-objective study: three completed trials report at step 5; a trial whose learning rate wrecks the
    model reports far below their median at step 5 of 10, is stopped there, and trials.csv says so and why."""
    run = run_context(tiny_config, tmp_path, test_plugins, trained_tiny, fmnist, trials=4, baselines=False)
    with open_study(run, tmp_path, resume=False) as study:
        for _ in range(3):
            study.optuna.enqueue_trial(params_for(run, steps=5, lr=1e-3, batch_size=32))
        study.optuna.enqueue_trial(params_for(run, steps=10, lr=0.3, batch_size=32))
    _, rows = run_optuna(run, tmp_path)
    finish_run(run, rows, tmp_path, log=lambda _: None)

    trials = pd.read_csv(tmp_path / "trials.csv")
    assert list(trials["state"]) == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    stopped = trials.iloc[3]
    assert "stopped early at step 5 of 10" in stopped["skipped"]
    assert "median rule" in stopped["skipped"]
    assert list(trials["progress"].iloc[:3].str.startswith("5:")) == [True] * 3
    assert stopped["progress"].startswith("5:") and " " not in stopped["progress"]  # no report after step 5
    assert math.isnan(stopped["val_accuracy"])
    assert (tmp_path / "pareto.csv").is_file()


def test_single_objective_search_prunes_with_successive_halving(
    tiny_config, tmp_path, trained_tiny, fmnist, test_plugins, early_reports
):
    run = run_context(tiny_config, tmp_path, test_plugins, trained_tiny, fmnist, trials=4, baselines=False,
                      objective="single")
    with open_study(run, tmp_path, resume=False) as study:
        assert len(study.optuna.directions) == 1 and type(study.optuna.pruner).__name__ == "SuccessiveHalvingPruner"
        for _ in range(3):
            study.optuna.enqueue_trial(params_for(run, steps=5, lr=1e-3, batch_size=32))
        study.optuna.enqueue_trial(params_for(run, steps=10, lr=0.3, batch_size=32))
    trials, _ = run_optuna(run, tmp_path)
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    pruned = trials[3]
    assert list(pruned.intermediate_values) == [5]
    assert "successive_halving pruner" in record_of(pruned)["skipped"]


def run_optuna(run, run_dir):
    """The queued trials of the run's study, run by the optuna backend: the study's trials and rows."""
    with open_study(run, run_dir, resume=True) as study:
        OptunaBackend().run(run, study, run_dir, True, log=lambda _: None)
        return study.optuna.get_trials(), study.rows()


# --- policies, saved models, errors -------------------------------------------------------------------------------


def test_policy_with_distillation_round_trips_and_the_saved_model_reloads(
    tiny_config, tmp_path, trained_tiny, fmnist, test_plugins
):
    plugins = test_plugins
    run = run_context(tiny_config, tmp_path, plugins, trained_tiny, fmnist)
    config, model = run.config, run.model
    blocks = [f"blocks.{b}.{n}" for b in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    policy = Policy(model="vit_tiny_patch16_224", techniques={
        "quantization": TechniqueSettings(layers={name: {"format": "int8_dynamic"} for name in blocks}),
        "distillation": TechniqueSettings(options={"steps": 10, "temperature": 4.0, "alpha": 0.7, "batch_size": 32}),
    })
    again = Policy.from_yaml(policy.to_yaml())
    assert again == policy and Policy.from_params(policy.to_params(), run.space.identities, model=policy.model) == policy

    compressed = run.compress(again, seed=3)
    path = tmp_path / "small.pt"
    save_compressed(path, compressed, again, config.model.name, config.model.kwargs)
    loaded, loaded_policy = load_compressed(path, plugins.techniques)  # structure_only: no teacher, no training
    assert loaded_policy == policy
    x = fmnist.val.images[:64]
    with torch.inference_mode():
        assert torch.equal(loaded(x), compressed(x))
        undistilled = autocompress.apply(model, Policy(techniques={"quantization": policy.techniques["quantization"]}),
                                         plugins)
        assert not torch.equal(loaded(x), undistilled(x)), "the saved model lost the recovery training"


def test_training_without_a_teacher_is_an_input_error_naming_the_option(trained_tiny, plugins):
    model, _ = trained_tiny
    policy = Policy(techniques={"distillation": TechniqueSettings(options={"steps": 10})})
    with pytest.raises(InputError) as info:
        autocompress.apply(model, policy, plugins)
    assert info.value.field == "policy.techniques.distillation.options.steps"
    off = Policy(techniques={"distillation": TechniqueSettings(options={"steps": 0, "lr": 0.1})})
    x = torch.zeros(2, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(autocompress.apply(model, off, plugins)(x), model(x))


@pytest.mark.parametrize("knob, value", [("alpha", 1.5), ("temperature", 0), ("steps", -1), ("steps", 2.5),
                                         ("lr", "fast")])
def test_bad_option_in_a_space_names_the_field(knob, value, plugins, trained_tiny):
    model, _ = trained_tiny
    space = autocompress.SearchSpace.from_dict({"techniques": {"distillation": {"options": {knob: [value]}}}})
    with pytest.raises(InputError) as info:
        space.resolve(model, plugins.techniques)
    assert info.value.field == f"space.techniques.distillation.options.{knob}"


@pytest.mark.parametrize("search, field", [({"objective": "pareto"}, "search.objective"),
                                           ({"pruner": "hyperband"}, "search.pruner"),
                                           ({"objective": "single", "pruner": "asha"}, "search.pruner")])
def test_bad_objective_or_pruner_is_an_input_error(search, field, tiny_config):
    from autocompress.config import validate

    with pytest.raises(InputError) as info:  # the schema rejects it as the mapping is read, validate() again later
        validate(config_from_dict({**tiny_config, "search": {**tiny_config["search"], **search}}))
    assert info.value.field == f"config.{field}"


# --- the multi-objective early-stopping rule ----------------------------------------------------------------------


def test_median_rule_compares_only_with_completed_trials_that_cost_no_more():
    rule = MedianRule(min_trials=3, cost_tolerance=0.05)
    cheap = [({25: 0.80}, 10.0), ({25: 0.82}, 10.0), ({25: 0.84}, 10.2)]
    costly = [({25: 0.95}, 20.0)] * 5
    assert rule.reason_to_stop(25, 0.70, 10.0, cheap + costly) is not None  # below the cheap trials' median
    assert rule.reason_to_stop(25, 0.83, 10.0, cheap + costly) is None  # above it; costly trials do not count
    assert rule.reason_to_stop(25, 0.70, 5.0, cheap + costly) is None  # nothing as cheap yet: go on
    assert rule.reason_to_stop(50, 0.10, 30.0, cheap + costly) is None  # nobody reported at step 50
    assert "0.8200 of 3 completed" in rule.reason_to_stop(25, 0.70, 10.0, cheap)


def test_trial_report_records_values_and_the_reason():
    report = TrialReport(lambda step, value, cost: "too low" if value < 0.5 else None, cost=3.0)
    assert report(25, 0.7) is False and report(50, 0.4) is True
    assert report.values == {25: 0.7, 50: 0.4} and report.reason == "too low"
    assert issubclass(autocompress.TrialStopped, Exception) and TrialStopped is autocompress.runner.TrialStopped

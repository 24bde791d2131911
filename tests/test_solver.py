"""The solver's path (search.strategy: solve): damages scored per setting, an exact multiple-choice knapsack, seeds
that are the first trials, a final recovery of the chosen policy, and a resume that scores nothing again."""

from __future__ import annotations

import itertools
import json
import math
import random

import pandas as pd
import pytest
import torch
import yaml

import autocompress
from autocompress.budget import Budget
from autocompress.config import config_from_dict
from autocompress.runner import prepare
from autocompress.seeding import plan_seeds
from autocompress.sensitivity import Sensitivity, kl_damage
from autocompress.solver import Option, solve

# --- the solver alone ----------------------------------------------------------------------------------------------


def _nested_problem(rng: random.Random, blocks: int = 3, block_options: int = 3, children: int = 2,
                    child_options: int = 3) -> list[Option]:
    """Blocks choose among ``block_options``; under each block option, each child chooses among ``child_options``
    with costs that depend on the block's choice (a pruned block's Linears are cheaper)."""
    options: list[Option] = []
    for b in range(blocks):
        for bo in range(block_options):
            parent = len(options)
            options.append(Option(f"b{b}", f"o{bo}", None, 0.0 if bo == 0 else rng.uniform(0.01, 1.0),
                                  (rng.uniform(1.0, 3.0) / (1 + bo),)))
            for c in range(children):
                for co in range(child_options):
                    options.append(Option(f"b{b}.c{c}", f"o{co}", parent, 0.0 if co == 0 else rng.uniform(0.01, 1.0),
                                          (rng.uniform(0.5, 2.0) / (1 + co) / (1 + bo),)))
    return options


def _brute_force(options: list[Option], limit: float, fixed: float) -> tuple[float, list[int]] | None:
    """Every path through every block, enumerated: the reference the solver must match."""
    per_block: dict[str, list[tuple[float, float, list[int]]]] = {}
    tops = [i for i, o in enumerate(options) if o.parent is None]
    for top in tops:
        kids: dict[str, list[int]] = {}
        for i, o in enumerate(options):
            if o.parent == top:
                kids.setdefault(o.layer, []).append(i)
        for combo in itertools.product(*kids.values()):
            chosen = [top, *combo]
            per_block.setdefault(options[top].layer, []).append(
                (sum(options[i].damage for i in chosen), sum(options[i].costs[0] for i in chosen), chosen))
    best = None
    for paths in itertools.product(*per_block.values()):
        cost = fixed + sum(p[1] for p in paths)
        damage = sum(p[0] for p in paths)
        if cost <= limit + 1e-9 and (best is None or damage < best[0] - 1e-12):
            best = (damage, sorted(i for p in paths for i in p[2]))
    return best


def test_the_solver_finds_the_exact_optimum_of_a_small_nested_knapsack():
    rng = random.Random(0)
    for trial in range(6):
        options = _nested_problem(rng)
        full = sum(max(o.costs[0] for o in options if o.layer == layer and o.parent == parent)
                   for layer, parent in {(o.layer, o.parent) for o in options} if parent is None or True)
        for fraction in (0.25, 0.4, 0.6, 0.9):
            limit = 1.0 + fraction * full
            expected = _brute_force(options, limit, fixed=1.0)
            chosen = solve(options, (limit,), (1.0,))
            if expected is None:
                assert chosen is None, f"problem {trial} at {fraction}: nothing fits, the solver chose {chosen}"
                continue
            assert chosen is not None, f"problem {trial} at {fraction}: a solution exists"
            damage = sum(options[i].damage for i in chosen)
            cost = 1.0 + sum(options[i].costs[0] for i in chosen)
            assert cost <= limit + 1e-9, "the chosen options are within the limit"
            assert damage == pytest.approx(expected[0], abs=1e-9), f"problem {trial} at {fraction}: not the optimum"
            # one option per layer under the chosen parent, none under parents not chosen
            picked = set(chosen)
            for i in chosen:
                parent = options[i].parent
                assert parent is None or parent in picked


def test_the_solver_says_when_nothing_fits():
    options = [Option("a", "", None, 0.0, (5.0,)), Option("a", "x", None, 0.3, (3.0,))]
    assert solve(options, (2.0,)) is None
    assert solve(options, (4.0,)) == [1]
    assert solve(options, (9.0,)) == [0], "the undamaged option wins when it fits"


def test_a_cutoff_keeps_the_optimum_when_it_beats_the_cutoff_and_returns_nothing_otherwise():
    rng = random.Random(1)
    for trial in range(4):
        options = _nested_problem(rng)
        full = sum(o.costs[0] for o in options)
        for fraction in (0.3, 0.6):
            limit = 1.0 + fraction * full
            expected = _brute_force(options, limit, fixed=1.0)
            if expected is None:
                continue
            above = solve(options, (limit,), (1.0,), cutoff=expected[0] + 0.05)
            assert above is not None, f"problem {trial} at {fraction}: the optimum beats the cutoff"
            assert sum(options[i].damage for i in above) == pytest.approx(expected[0], abs=1e-9)
            if expected[0] > 0.01:
                assert solve(options, (limit,), (1.0,), cutoff=expected[0] - 0.01) is None, \
                    f"problem {trial} at {fraction}: nothing beats a cutoff below the optimum"


# --- damage ----------------------------------------------------------------------------------------------------------


def test_the_identity_setting_does_no_damage_and_a_compressed_one_does(trained_tiny, fmnist, plugins):
    model, _ = trained_tiny
    images = fmnist.train.images[:64]
    from autocompress.evaluate import logits

    assert kl_damage(logits(model, images), model, images) == 0.0  # measured, not assumed
    import copy

    from autocompress.compose import apply_policy
    from autocompress.policy import Policy

    pruned = apply_policy(model, Policy.from_dict({"techniques": {"pruning": {"layers": {
        "blocks.0": {"mlp": 0.25}, "blocks.1": {"mlp": 0.25}}}}}), plugins.techniques)
    calls = []

    def compress(params):
        calls.append(params)
        return copy.deepcopy(model) if not params else pruned

    sens = Sensitivity(model, images, compress)
    out = sens.measure([("", {}), ("mlp", {"x": 1})])
    assert out[""] == 0.0 and len(calls) == 1, "the identity is zero by definition and never scored"
    assert out["mlp"] > 0.01


def test_a_setting_on_a_later_block_is_scored_from_the_kept_input_of_that_block(trained_tiny, fmnist, plugins):
    """Skipping the unchanged blocks is exact: the same damages as a whole pass, setting by setting; and a global
    option that changes the earlier blocks too (compute bf16) is caught and run whole."""
    from autocompress.compose import apply_policy
    from autocompress.policy import Policy

    model, _ = trained_tiny
    images = fmnist.train.images[:96]
    identities = {"blocks.1:pruning.mlp": 1.0, "blocks.1.mlp.fc1:quantization.format": "fp32",
                  "blocks.0.mlp.fc1:quantization.format": "fp32", "quantization.compute": "fp32"}

    def compress(params):
        return apply_policy(model, Policy.from_params({k: v for k, v in params.items() if v != identities[k]}),
                            plugins.techniques)

    wanted = [("mlp", {**identities, "blocks.1:pruning.mlp": 0.5}),
              ("fc1 int8", {**identities, "blocks.1.mlp.fc1:quantization.format": "int8_dynamic"}),
              ("fc1 bf16 compute", {**identities, "blocks.1.mlp.fc1:quantization.format": "int8_dynamic",
                                    "quantization.compute": "bf16"}),
              ("block 0", {**identities, "blocks.0.mlp.fc1:quantization.format": "int8_dynamic"})]
    skipping = Sensitivity(model, images, compress, identities=identities)
    whole = Sensitivity(model, images, compress)
    assert skipping.prefix_for(wanted[0][1], identities).index == 1
    assert skipping.prefix_for(wanted[3][1], identities) is None  # block 0: nothing before it to skip
    got, expected = skipping.measure(wanted), whole.measure(wanted)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-9), key
    assert expected["mlp"] > 0


def _block_settings(model, plugins):
    """Every block's pruning, low-rank and int8 settings alone on the tiny ViT (and one under compute=bf16, which
    changes every block), with the compress function the search would use."""
    from autocompress.compose import apply_policy
    from autocompress.policy import Policy

    identities = {"quantization.compute": "fp32"}
    for b in range(len(model.blocks)):
        identities.update({f"blocks.{b}:pruning.mlp": 1.0, f"blocks.{b}:pruning.heads": 1.0})
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            identities.update({f"blocks.{b}.{layer}:quantization.format": "fp32", f"blocks.{b}.{layer}:lowrank.rank": 1.0})

    def compress(params):
        return apply_policy(model, Policy.from_params({k: v for k, v in params.items() if v != identities[k]}),
                            plugins.techniques)

    wanted = []
    for b in range(len(model.blocks)):
        wanted += [(f"b{b} mlp {m}", {**identities, f"blocks.{b}:pruning.mlp": m}) for m in (0.75, 0.5, 0.25)]
        wanted.append((f"b{b} heads", {**identities, f"blocks.{b}:pruning.heads": 0.67}))
        for layer in ("attn.qkv", "mlp.fc1", "mlp.fc2"):
            wanted += [(f"b{b} {layer} rank {r}", {**identities, f"blocks.{b}.{layer}:lowrank.rank": r})
                       for r in (0.5, 0.25)]
            wanted.append((f"b{b} {layer} int8", {**identities, f"blocks.{b}.{layer}:quantization.format": "int8_dynamic"}))
        wanted.append((f"b{b} fc1 int8 compute bf16", {**identities, "quantization.compute": "bf16",
                                                       f"blocks.{b}.mlp.fc1:quantization.format": "int8_dynamic"}))
    return identities, compress, wanted


def _ranks(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


def test_the_fisher_estimate_of_a_block_setting_tracks_the_kl_pass(trained_tiny, fmnist, plugins):
    """The Fisher method scores a setting by its block alone, yet orders the settings as the whole KL pass does and
    lands near its values (measured on this tiny ViT: Spearman 0.99, ratios 0.57-1.22); the identity stays zero."""
    model, _ = trained_tiny
    images = fmnist.train.images[:128]
    identities, compress, wanted = _block_settings(model, plugins)
    exact = Sensitivity(model, images, compress, identities=identities).measure([("", identities), *wanted])
    fisher = Sensitivity(model, images, compress, identities=identities, method="fisher")
    estimate = fisher.measure([("", identities), *wanted])
    assert estimate[""] == 0.0
    assert fisher.by_fisher == len(wanted), "every setting here is confined to one block (or one global option)"
    # the KL pass it falls back on skips the unchanged blocks with the inputs the Fisher pass kept: the same ones
    kept = fisher.prefix_for(dict(wanted)["b1 mlp 0.5"], identities)
    assert kept.index == 1 and torch.equal(kept.inputs, fisher._capture()[("blocks", 1)].inputs)
    keys = [k for k, _ in wanted]
    a, b = _ranks([exact[k] for k in keys]), _ranks([estimate[k] for k in keys])
    mean = sum(a) / len(a)
    spearman = sum((x - mean) * (y - mean) for x, y in zip(a, b)) / sum((x - mean) ** 2 for x in a)
    assert spearman > 0.9, spearman
    for k in keys:
        if exact[k] > 1e-4:  # below it both are float noise on this model
            assert 0.4 < estimate[k] / exact[k] < 2.5, (k, exact[k], estimate[k])


def test_auto_scores_by_fisher_only_when_the_kl_pass_would_not_fit_and_a_resume_keeps_the_choice(
        trained_tiny, fmnist, plugins, tmp_path):
    from autocompress.sensitivity import MIN_FISHER_IMAGES

    model, _ = trained_tiny
    images = fmnist.train.images[:128]
    identities, compress, wanted = _block_settings(model, plugins)
    wanted = wanted[:6]
    roomy = Sensitivity(model, images, compress, identities=identities, method="auto", seconds=1e6)
    roomy.measure(wanted)
    assert roomy.chosen == "kl" and roomy.by_fisher == 0 and len(roomy.images) == 128
    lines = []
    path = tmp_path / "sensitivity.json"
    tight = Sensitivity(model, images, compress, path=path, identities=identities, method="auto", seconds=1e-6,
                        log=lines.append)
    scored = tight.measure(wanted)
    assert tight.chosen == "fisher" and tight.by_fisher == len(wanted)
    assert len(tight.images) == MIN_FISHER_IMAGES, "as many images as fit, never fewer than the floor"
    assert len(lines) == 1 and "search.sensitivity_seconds" in lines[0] and "Fisher" in lines[0], lines
    # a resumed run (here with all the time in the world) scores the rest the way the first run did
    again = Sensitivity(model, images, compress, path=path, identities=identities, method="auto", seconds=1e6)
    assert again.measure(wanted) == scored and again.measured == 0
    assert again.chosen == "fisher" and len(again.images) == MIN_FISHER_IMAGES
    # asking for the KL pass explicitly scores again
    kl = Sensitivity(model, images, compress, path=path, identities=identities, method="kl")
    kl.measure(wanted)
    assert kl.measured == len(wanted)


def test_auto_counts_the_time_to_build_each_setting_and_builds_none_twice(trained_tiny, fmnist, plugins):
    """A compression made slow on purpose (0.1 s a setting): its forward passes fit the time given, building the
    settings does not, so auto scores by Fisher on the fewest images and says why; each setting is built once."""
    import time

    from autocompress.sensitivity import MIN_FISHER_IMAGES

    model, _ = trained_tiny
    images = fmnist.train.images[:128]
    identities, compress, wanted = _block_settings(model, plugins)
    wanted = wanted[:6]
    built: list[str] = []

    def slow(params):
        time.sleep(0.1)
        built.append(json.dumps(params, sort_keys=True))
        return compress(params)

    fast = Sensitivity(model, images, compress, identities=identities, method="auto", seconds=0.5)
    fast.measure(wanted)
    assert fast.chosen == "kl", f"the premise: the forward passes alone fit 0.5 s ({fast.why})"
    lines: list[str] = []
    sens = Sensitivity(model, images, slow, identities=identities, method="auto", seconds=0.5, log=lines.append)
    scored = sens.measure(wanted)
    assert sens.chosen == "fisher" and len(sens.images) == MIN_FISHER_IMAGES
    assert "building the compressed models" in sens.why and "does not fit" in sens.why, sens.why
    assert len(lines) == 1 and "search.sensitivity_seconds" in lines[0]
    base = json.dumps(identities, sort_keys=True)  # the Fisher pass's reference: the global options alone, once
    assert built.count(base) == 1
    assert sorted(b for b in built if b != base) == sorted(json.dumps(p, sort_keys=True) for _, p in wanted), \
        "each setting built once"
    assert all(math.isfinite(v) for v in scored.values())


# --- the solver's path end to end ------------------------------------------------------------------------------------


def _space(tmp_path, recovery: bool = True) -> str:
    space = {"techniques": {
        "quantization": {"layers": [{"match": "re:blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.(fc1|fc2))",
                                     "format": ["fp32", "bf16"]}]},
        "pruning": {"layers": [{"match": "re:blocks\\.\\d+", "mlp": [1.0, 0.5, 0.25]}]},
        **({"distillation": {"options": {"steps": [0, 25]}}} if recovery else {}),
    }}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def _memory_config(tiny_config, tmp_path, recovery: bool = True, **search) -> dict:
    return {**tiny_config, "space": _space(tmp_path, recovery), "budget": "memory=0.45x",
            "search": {"trials": 5, "sampler": "tpe", "seed": 0, "finalize_steps": 0, **search}}


def test_solver_seeds_are_predicted_within_the_budget_and_come_first(tiny_config, tmp_path):
    """A memory budget (exact costs): every seed's predicted memory is within its fraction of the limit and is the
    memory its model really has; the seeds are the trials after the uncompressed model, marked as the solver's;
    once they are measured, a second wave solved again (excluding what was tried) follows them."""
    config = config_from_dict(_memory_config(tiny_config, tmp_path, recovery=False, trials=7))
    lines = []
    result = autocompress.search(config, progress=False, log=lines.append)
    trials = result.trials.set_index("number")
    assert trials.loc[0, "baseline"] == "uncompressed" and trials.loc[0, "origin"] == "baseline"
    front = pd.read_csv(tmp_path / "run" / "solver.csv")
    first = front[~front["label"].str.contains("corrected")]
    assert len(first) >= 2, "several fractions of the limit give several seeds"
    assert len(front) > len(first), "a second wave was solved once the first was measured"
    assert front.loc[len(first), "label"].startswith("solver 0.95x limit, wave 2")
    seeds = trials[trials["origin"] == "solver"]
    assert len(seeds) > len(first), "the second wave ran"
    assert list(seeds.index) == list(range(1, 1 + len(seeds))), "the waves before any sampler trial"
    assert list(seeds["seed"]) == list(front["label"][: len(seeds)]), "solver.csv lists the waves in order"
    for (_, seed), (_, row) in zip(front.iterrows(), seeds.iterrows()):
        assert seed["predicted_memory_mb"] <= seed["fraction"] * result.limit + 1e-9
        assert row["memory_mb"] == pytest.approx(seed["predicted_memory_mb"], rel=1e-6), "memory costs are exact"
        assert row["feasible"]
    policies = [tuple(sorted((k, str(v)) for k, v in row.items() if ":" in str(k))) for _, row in seeds.iterrows()]
    assert len(set(policies)) == len(policies), "no seed repeats another"
    assert set(trials.loc[1 + len(seeds):, "origin"]) <= {"sampler"}
    assert any(line.startswith("sensitivity: ") for line in lines)
    assert (tmp_path / "run" / "sensitivity.json").is_file()
    phases = yaml.safe_load((tmp_path / "run" / "phases.yaml").read_text())
    assert {"baseline", "sensitivity", "solve", "trials"} <= set(phases)
    page = (tmp_path / "run" / "report.html").read_text()
    assert 'id="solver-front"' in page and 'id="phase-times"' in page


def _every_policy(space) -> list[dict]:
    """Every combination of the space's choices, as search parameters (for spaces small enough to enumerate)."""
    return [{d.name: v for d, v in zip(space.dimensions, values)}
            for values in itertools.product(*(d.choices for d in space.dimensions))]


def test_latency_seeds_cost_what_the_table_predicts(tiny_config, tmp_path):
    """The solver's cost of a seed is the latency model's prediction for its whole policy (the per-option split
    adds up), and within the fraction of the limit it aimed at."""
    space = {"techniques": {
        "lowrank": {"layers": [{"match": "re:blocks\\.\\d+\\.mlp\\.(fc1|fc2)", "rank": [1.0, 0.25]}]},
        "pruning": {"layers": [{"match": "re:blocks\\.\\d+", "mlp": [1.0, 0.5, 0.25]}]},
    }}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    config = config_from_dict({**tiny_config, "space": str(tmp_path / "space.yaml"), "budget": "latency=0.99x",
                               "search": {"trials": 1, "seed": 0, "latency_table": str(tmp_path / "table.json")}})
    run = prepare(config, log=lambda _: None)
    assert run.latency_model is not None, "strategy solve profiles the table first"
    # a limit the table says the fastest policy meets at the lowest fraction (whatever this CPU measured). Not the
    # most compressed one: on a Xeon with AMX, rank 0.25 on the tiny model's MLPs pruned to 0.25 (48 -> 12 -> 48)
    # was predicted slower than the dense model, two small GEMMs costing more than one
    policies = _every_policy(run.space)
    cheapest = min(run.latency_model.predict(p) for p in policies)
    assert cheapest < run.latency_model.base_ms, "pruning and low rank shorten the table's prediction"
    run.budget = Budget.parse(f"latency_ms={1.01 * cheapest / min(run.config.search.solver_fractions):.6f}")
    plan = plan_seeds(run, tmp_path, log=lambda _: None)
    assert plan.seeds, plan.why_none
    for seed in plan.seeds:
        assert seed.predicted == pytest.approx(run.latency_model.predict(seed.params), rel=1e-6)
        assert seed.predicted <= seed.fraction * run.limit + 1e-9


def test_a_budget_just_past_the_floor_is_seeded_within_the_margin_and_one_far_past_it_names_the_floor(
        tiny_config, tmp_path):
    """Nothing is predicted within the limit: the solver logs the fastest latency the space reaches (no policy is
    predicted faster), and seeds the least damaging policies predicted within latency_model_margin x the limit,
    which the search measures anyway; with the limit below floor / margin there are no seeds, and the reason
    names the floor."""
    space = {"techniques": {
        "lowrank": {"layers": [{"match": "re:blocks\\.\\d+\\.mlp\\.(fc1|fc2)", "rank": [1.0, 0.25]}]},
        "pruning": {"layers": [{"match": "re:blocks\\.\\d+", "mlp": [1.0, 0.5, 0.25]}]},
    }}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    config = config_from_dict({**tiny_config, "space": str(tmp_path / "space.yaml"), "budget": "latency=0.99x",
                               "search": {"trials": 1, "seed": 0, "latency_table": str(tmp_path / "table.json"),
                                          "latency_model_margin": 1.1}})
    run = prepare(config, log=lambda _: None)
    assert run.latency_model is not None
    plan = plan_seeds(run, tmp_path, log=lambda _: None)
    floor = plan.solver.fastest()
    policies = _every_policy(run.space)
    assert floor == pytest.approx(min(run.latency_model.predict(p) for p in policies), rel=1e-6), \
        "the floor is the least prediction over every policy of the space"

    run.budget = Budget.parse(f"latency_ms={floor / 1.05:.6f}")  # within the margin: 1.05 x the limit reaches it
    lines: list[str] = []
    plan = plan_seeds(run, tmp_path, log=lines.append)
    assert any(line.startswith("solver: the fastest policy of this space is predicted at") and f"{floor:.2f} ms" in line
               for line in lines), lines
    assert plan.seeds, plan.why_none
    for seed in plan.seeds:
        assert run.limit < seed.predicted <= 1.1 * run.limit * (1 + 1e-9)
        assert "margin 1.1" in seed.label
        assert seed.predicted == pytest.approx(run.latency_model.predict(seed.params), rel=1e-6)

    run.budget = Budget.parse(f"latency_ms={floor / 1.2:.6f}")  # past the margin: nothing to measure
    plan = plan_seeds(run, tmp_path, log=lambda _: None)
    assert not plan.seeds
    assert "fastest policy is predicted at" in plan.why_none and "margin" in plan.why_none, plan.why_none


def test_a_resumed_run_neither_profiles_nor_scores_again(tiny_config, tmp_path):
    space = {"techniques": {"pruning": {"layers": [{"match": "re:blocks\\.\\d+", "mlp": [1.0, 0.5, 0.25]}]}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    base = {**tiny_config, "space": str(tmp_path / "space.yaml"), "budget": "latency=0.9x",
            "search": {"trials": 3, "seed": 0, "finalize_steps": 0, "latency_table": str(tmp_path / "table.json")}}
    first: list[str] = []
    autocompress.search(config_from_dict(base), progress=False, log=first.append)
    assert any(line.startswith("latency table ") for line in first), "the first run profiles"
    assert any(line.startswith("sensitivity: ") for line in first), "the first run scores"
    scored = json.loads((tmp_path / "run" / "sensitivity.json").read_text())["damage"]
    again: list[str] = []
    result = autocompress.search(config_from_dict({**base, "search": {**base["search"], "trials": 4}}),
                                 resume=True, progress=False, log=again.append)
    assert len(result.trials) == 4
    assert not any(line.startswith(("latency table ", "sensitivity: ", "timing each choice")) for line in again), again
    assert json.loads((tmp_path / "run" / "sensitivity.json").read_text())["damage"] == scored


def test_the_final_recovery_raises_validation_accuracy_of_a_damaged_policy(tiny_config, tmp_path):
    from autocompress.search.run import _finalize
    from autocompress.evaluate import accuracy

    config = config_from_dict(_memory_config(tiny_config, tmp_path))
    run = prepare(config, log=lambda _: None)
    params = {d.name: (0.25 if d.knob == "mlp" else d.identity) for d in run.space.dimensions}
    policy = run.policy(params)
    model = run.compress(policy, seed=0)
    val = accuracy(model, run.data.val)
    lines = []
    final_model, final_policy, final_val = _finalize(run, policy, model, val, steps=150, seed=0, log=lines.append)
    assert final_val > val + 0.01, f"{val:.4f} -> {final_val:.4f}"
    assert final_policy.techniques["distillation"].options["steps"] == 150
    assert accuracy(final_model, run.data.val) == pytest.approx(final_val)
    assert lines and lines[0].startswith("finalize: ")


def test_the_skip_rule_applies_the_correction_the_later_waves_are_solved_with():
    """A later wave is solved against the limit corrected by what the seeds measured; the rule that skips a
    candidate unmeasured must use the same correction, or it skips the very policies the wave proposed."""
    from types import SimpleNamespace

    from autocompress.config import SearchConfig
    from autocompress.runner import predicted_over
    from autocompress.seeding import second_wave

    run = SimpleNamespace(limits={"latency_ms": 64.0}, config=SimpleNamespace(search=SearchConfig()),
                          latency_correction=1.0, budget=Budget.parse("latency_ms=64"))
    asked = []
    solver = SimpleNamespace(run=run, seeds=lambda fractions, scale, label: asked.append(scale) or [],
                             write=lambda: None)
    second_wave(solver, [(63.8, 51.4)])  # the DeiT-S seed: measured 0.81x its prediction
    assert asked == [pytest.approx(51.4 / 63.8)] and run.latency_correction == pytest.approx(51.4 / 63.8)
    assert predicted_over(run, 79.2) is False, "a wave seed predicted 79 ms measures about 64: measured, not skipped"
    assert predicted_over(run, 100.0) is True
    run.latency_correction = 1.0
    assert predicted_over(run, 79.2) is True, "uncorrected, 79 ms is over 1.1 x 64"
    assert predicted_over(run, float("nan")) is False

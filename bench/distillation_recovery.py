"""What does recovery training (the distillation plugin) buy at a tight budget? Measured on the demo ViT.

Part 1, fixed policies: heavily pruned / factorized demo ViTs (measured latency well below the dense model), their
validation accuracy without recovery training and after 50, 100 and 200 distillation steps (batch 128), with the
training time each took. Latency ratios are interleaved runs against the dense model, batch 256.

Part 2, best policy under a budget with and without the plugin: an exhaustive search over a small grid of uniform
policies (heads kept x MLP kept x bf16 or not, 18 in all), each policy's latency measured interleaved against the
dense model. For each budget (``--budgets``, fractions of the dense latency) the best validation accuracy among the
policies within it, with no recovery training and with ``--steps`` distillation steps. (A TPE search with a few
dozen trials over the full per-block space rarely lands under 0.3-0.4x on this model, so it would measure luck.)

    python bench/distillation_recovery.py [--checkpoint PATH] [--budgets 0.3 0.4 0.5] [--steps 100] [--skip-fixed]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

from autocompress.compose import apply_policy  # noqa: E402
from autocompress.config import load_config  # noqa: E402
from autocompress.costs import compare_latency  # noqa: E402
from autocompress.evaluate import accuracy  # noqa: E402
from autocompress.models import create_model, load_checkpoint  # noqa: E402
from autocompress.pluginmanager import load_plugins  # noqa: E402
from autocompress.policy import Policy  # noqa: E402
from autocompress.runner import example_batch, load_data, make_apply_context  # noqa: E402
from autocompress.technique import TechniqueSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "fashion_mnist.yaml"
STEPS = (0, 50, 100, 200)


def tight_policies(depth: int) -> dict[str, Policy]:
    blocks = [f"blocks.{i}" for i in range(depth)]
    linears = [f"{b}.{n}" for b in blocks for n in ("attn.qkv", "mlp.fc1", "mlp.fc2")]
    return {
        "prune: 1 of 3 heads, 25% MLP": Policy(techniques={
            "pruning": TechniqueSettings(layers={b: {"heads": 0.34, "mlp": 0.25} for b in blocks})}),
        "prune: 2 of 3 heads, 50% MLP + bf16": Policy(techniques={
            "pruning": TechniqueSettings(layers={b: {"heads": 0.67, "mlp": 0.5} for b in blocks}),
            "quantization": TechniqueSettings(
                layers={f"{b}.{n}": {"format": "bf16"} for b in blocks for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")},
                options={"compute": "bf16"})}),
        "low rank 0.25 (qkv, fc1, fc2)": Policy(techniques={
            "lowrank": TechniqueSettings(layers={n: {"rank": 0.25} for n in linears})}),
    }


def with_steps(policy: Policy, steps: int) -> Policy:
    policy = copy.deepcopy(policy)
    if steps:
        policy.techniques["distillation"] = TechniqueSettings(options={"steps": steps})
    return policy


def compress_and_time(config, model, data, techniques, policy: Policy, cache: dict, example, repeats: int):
    """The compressed model and its latency as a ratio to the dense model's, the two timed interleaved."""
    compressed = apply_policy(model, policy, techniques, make_apply_context(config, model, data, 0, cache))
    lat = compare_latency({"dense": model, "compressed": compressed}, example, config.target.threads, 3, repeats)
    return compressed, lat["compressed"].median_ms / lat["dense"].median_ms


def fixed_policies(config, model, data, techniques, repeats: int) -> list[dict]:
    example = example_batch(data, config.target.batch_size)
    cache: dict = {}
    rows = []
    for label, policy in tight_policies(len(model.blocks)).items():
        _, ratio = compress_and_time(config, model, data, techniques, policy, cache, example, repeats)
        for steps in STEPS:
            started = time.perf_counter()
            out = apply_policy(model, with_steps(policy, steps), techniques,
                               make_apply_context(config, model, data, 0, cache))
            seconds = time.perf_counter() - started
            row = {"policy": label, "latency_ratio": ratio, "steps": steps, "val_accuracy": accuracy(out, data.val),
                   "seconds": seconds}
            print(row, flush=True)
            rows.append(row)
    return rows


def grid_policies(depth: int) -> dict[str, Policy]:
    """Uniform structural policies (the same pruning in every block), each dense-format or bf16 everywhere."""
    blocks = [f"blocks.{i}" for i in range(depth)]
    linears = [f"{b}.{n}" for b in blocks for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    out = {}
    for heads in (1.0, 0.67, 0.34):
        for mlp in (1.0, 0.5, 0.25):
            for bf16 in (False, True):
                techniques = {}
                if heads < 1 or mlp < 1:
                    techniques["pruning"] = TechniqueSettings(layers={b: {"heads": heads, "mlp": mlp} for b in blocks})
                if bf16:
                    techniques["quantization"] = TechniqueSettings(
                        layers={n: {"format": "bf16"} for n in linears}, options={"compute": "bf16"})
                out[f"heads {heads}, mlp {mlp}{', bf16' if bf16 else ''}"] = Policy(techniques=techniques)
    return out


def best_under_budgets(config, model, data, techniques, budgets, steps: int, repeats: int) -> dict:
    """Exhaustive search over :func:`grid_policies`: for each budget, the best policy within it by validation
    accuracy, with no recovery training and with ``steps`` distillation steps (each policy's latency measured
    interleaved against the dense model)."""
    example = example_batch(data, config.target.batch_size)
    cache: dict = {}
    rows = []
    for label, policy in grid_policies(len(model.blocks)).items():
        plain, ratio = compress_and_time(config, model, data, techniques, policy, cache, example, repeats)
        row = {"policy": label, "latency_ratio": ratio, "val_plain": accuracy(plain, data.val), "val_distilled": None}
        if row["latency_ratio"] <= max(budgets):
            distilled = apply_policy(model, with_steps(policy, steps), techniques,
                                     make_apply_context(config, model, data, 0, cache))
            row["val_distilled"] = accuracy(distilled, data.val)
            row["test_plain"], row["test_distilled"] = accuracy(plain, data.test), accuracy(distilled, data.test)
        print(row, flush=True)
        rows.append(row)
    summary = {}
    for budget in budgets:
        within = [r for r in rows if r["latency_ratio"] <= budget]
        if not within:
            summary[str(budget)] = None
            continue
        plain = max(within, key=lambda r: r["val_plain"])
        # with the plugin a policy may still use 0 steps: its best is the better of the two per policy
        options = [(r, "plain") for r in within] + [(r, "distilled") for r in within if r["val_distilled"] is not None]
        best, kind = max(options, key=lambda o: o[0][f"val_{o[1]}"])
        summary[str(budget)] = {
            "without": {"policy": plain["policy"], "latency_ratio": plain["latency_ratio"],
                        "val": plain["val_plain"], "test": plain["test_plain"]},
            "with": {"policy": best["policy"], "latency_ratio": best["latency_ratio"], "steps": steps if kind == "distilled" else 0,
                     "val": best[f"val_{kind}"], "test": best[f"test_{kind}"]},
        }
    return {"rows": rows, "best": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="demo base checkpoint (default: the demo config's)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-fixed", action="store_true", help="only part 2")
    args = parser.parse_args()
    config = load_config(CONFIG)
    checkpoint = args.checkpoint or config.resolve_path(config.model.checkpoint)
    torch.set_num_threads(config.target.threads)
    data = load_data(config)
    model = load_checkpoint(create_model(config.model.name, config.model.kwargs), checkpoint)
    techniques = load_plugins().techniques
    dense = {"val": accuracy(model, data.val), "test": accuracy(model, data.test)}

    if not args.skip_fixed:
        rows = fixed_policies(config, model, data, techniques, args.repeats)
        print(f"\n### Recovery training on the demo ViT (dense val accuracy {dense['val']:.4f})\n")
        print(markdown_table(["policy", "latency vs dense", "distillation steps", "val accuracy", "seconds"],
                             [(r["policy"], r["latency_ratio"], r["steps"], r["val_accuracy"], r["seconds"])
                              for r in rows]))
        print(f"wrote {write_json('distillation_recovery', {'checkpoint': str(checkpoint), 'dense': dense, 'fixed_policies': rows})}")

    grid = best_under_budgets(config, model, data, techniques, args.budgets, args.steps, args.repeats)
    print(f"\n### Best uniform policy under a latency budget, without and with {args.steps} distillation steps "
          f"(dense: val {dense['val']:.4f}, test {dense['test']:.4f})\n")
    table = []
    for budget, best in grid["best"].items():
        if best is None:
            table.append((f"{budget}x", "nothing within budget", "", "", "", "", ""))
            continue
        w, d = best["without"], best["with"]
        table.append((f"{budget}x", w["policy"], w["val"], w["test"], f"{d['policy']} ({d['steps']} steps)", d["val"],
                      d["test"]))
    print(markdown_table(["budget", "best without the plugin", "val", "test", "best with it", "val", "test"], table))
    print(f"wrote {write_json('distillation_budget_grid', {'checkpoint': str(checkpoint), 'dense': dense, 'steps': args.steps, **grid})}")


if __name__ == "__main__":
    main()

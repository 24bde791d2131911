"""Where does low-rank factorization start to pay on this CPU? Measured, not derived from multiply-add counts.

Two smaller GEMMs do ``r * (in + out)`` instead of ``in * out`` multiply-adds per token, but each GEMM has fixed
overhead and small inner dimensions run below peak, so the rank at which a factorized model is really faster is
found by timing. For the demo ViT (``examples/fashion_mnist.yaml`` kwargs, batch 256) and the DeiT-S architecture
(224x224, batch 8), every block Linear is factorized at each rank fraction (layers where that rank would not save
anything stay dense) and the whole model is timed against the dense one, interleaved (A B C ...), median. A second
table times each distinct layer shape alone at the same token count. Random weights: latency does not depend on them.

    OMP_WAIT_POLICY=PASSIVE python bench/lowrank.py [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

from autocompress.compose import apply_policy  # noqa: E402
from autocompress.costs import compare_latency  # noqa: E402
from autocompress.pluginmanager import load_plugins  # noqa: E402
from autocompress.policy import Policy  # noqa: E402
from autocompress.technique import ApplyContext, TechniqueSettings  # noqa: E402
from autocompress_lowrank import LowRankLinear, break_even_rank, resolve_rank, svd_factors  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FRACTIONS = (0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)


def demo_kwargs() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "examples" / "fashion_mnist.yaml").read_text())
    return dict(config["model"]["kwargs"])


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def factorized_models(model: nn.Module, fractions: tuple[float, ...]) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """The dense model and one model per rank fraction (every block Linear whose rank saves cost factorized)."""
    plugins = load_plugins()
    technique = plugins.techniques["lowrank"]
    layers = technique.candidate_layers(model)
    models: dict[str, nn.Module] = {"dense": model}
    counts: dict[str, int] = {"dense": 0}
    ctx = ApplyContext(cache={})  # factors computed once per layer, sliced per rank
    for frac in fractions:
        chosen = {}
        for layer in layers:
            try:
                technique.check_value(model, layer, "rank", frac)
            except ValueError:
                continue
            chosen[layer] = {"rank": frac}
        policy = Policy({"lowrank": TechniqueSettings(layers=chosen)})
        models[f"{frac:g}"] = apply_policy(model, policy, plugins.techniques, ctx)
        counts[f"{frac:g}"] = len(chosen)
    return models, counts


def layer_shapes(model: nn.Module) -> list[tuple[str, int, int]]:
    technique = load_plugins().techniques["lowrank"]
    seen: dict[tuple[int, int], str] = {}
    for layer in technique.candidate_layers(model):
        linear = model.get_submodule(layer)
        seen.setdefault((linear.in_features, linear.out_features), layer.split(".", 2)[-1])
    return [(kind, i, o) for (i, o), kind in seen.items()]


def bench_layers(model: nn.Module, tokens: int, fractions: tuple[float, ...], threads: int, repeats: int) -> list[dict]:
    """One Linear of each distinct shape, dense vs factorized, on ``tokens`` rows (batch x sequence)."""
    rows = []
    for kind, i, o in layer_shapes(model):
        torch.manual_seed(0)
        dense = nn.Linear(i, o)
        factors = svd_factors(dense.weight)
        variants: dict[str, nn.Module] = {"dense": dense}
        for frac in fractions:
            rank = resolve_rank(frac, i, o)
            if rank is not None and rank < break_even_rank(i, o):
                up, down = factors.truncate(rank)
                variants[f"{frac:g}"] = LowRankLinear.from_factors(up, down, dense.bias.detach())
        x = torch.randn(tokens, i)
        lat = compare_latency(variants, x, threads=threads, warmup=3, repeats=repeats)
        base = lat["dense"].median_ms
        for name, l in lat.items():
            rank = None if name == "dense" else variants[name].rank
            rows.append({"layer": kind, "in": i, "out": o, "fraction": name, "rank": rank,
                         "break_even_rank": round(break_even_rank(i, o), 1), "median_ms": l.median_ms,
                         "speedup": base / l.median_ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {
        "demo ViT (28x28, batch 256)": (timm.create_model("vit_tiny_patch16_224", pretrained=False, **demo_kwargs()),
                                        torch.randn(256, 1, 28, 28)),
        "DeiT-S (224x224, batch 8)": (timm.create_model("deit_small_patch16_224", pretrained=False),
                                      torch.randn(8, 3, 224, 224)),
    }
    results: dict[str, Any] = {}
    for label, (model, x) in cases.items():
        model.eval()
        models, counts = factorized_models(model, FRACTIONS)
        total = len(load_plugins().techniques["lowrank"].candidate_layers(model))
        lat = compare_latency(models, x, threads=args.threads, warmup=2, repeats=args.repeats)
        base_ms, base_params = lat["dense"].median_ms, params(model)
        model_rows = [{"fraction": name, "layers_factorized": counts[name], "layers": total,
                       "params": params(models[name]), "params_ratio": params(models[name]) / base_params,
                       "median_ms": l.median_ms, "speedup": base_ms / l.median_ms, "spread": l.spread}
                      for name, l in lat.items()]
        tokens = x.shape[0] * (model.patch_embed.num_patches + model.num_prefix_tokens)
        layer_rows = bench_layers(model, tokens, FRACTIONS, args.threads, args.repeats)
        print(f"\n### {label}, {args.threads} threads: whole model, every block Linear at the rank fraction\n")
        print(markdown_table(
            ["rank fraction", "layers factorized", "params (M)", "params ratio", "median ms", "speedup", "IQR/median"],
            [(r["fraction"], f"{r['layers_factorized']}/{r['layers']}", r["params"] / 1e6, r["params_ratio"],
              r["median_ms"], r["speedup"], r["spread"]) for r in model_rows]))
        print(f"\n### {label}: one layer of each shape alone, {tokens} tokens\n")
        print(markdown_table(
            ["layer", "in->out", "fraction", "rank", "break-even rank", "median ms", "speedup"],
            [(r["layer"], f"{r['in']}->{r['out']}", r["fraction"], r["rank"] if r["rank"] is not None else "-",
              r["break_even_rank"], r["median_ms"], r["speedup"]) for r in layer_rows]))
        results[label] = {"batch": int(x.shape[0]), "tokens": tokens, "model": model_rows, "layers": layer_rows}
    path = write_json("lowrank", {"threads": args.threads, "repeats": args.repeats, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

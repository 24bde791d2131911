"""How much faster does structured pruning make a ViT on this CPU? Measured latency vs. fraction of heads / MLP pruned.

Removing heads shrinks ``qkv``, ``proj`` and the attention itself; narrowing the MLP shrinks ``fc1`` and ``fc2``. What
that buys end to end depends on GEMM efficiency at the smaller shapes and on the parts pruning does not touch (patch
embedding, norms, head), so it is timed. For the demo ViT (``examples/fashion_mnist.yaml`` kwargs, batch 256) and the
DeiT-S architecture (224x224, batch 8), every block is pruned uniformly: heads only, MLP only, and both. All variants
are timed interleaved with the dense model (A B C ...), median of the repeats. Random weights: latency does not
depend on them, so the pruned structure is built with ``structure_only`` (no scoring).

    OMP_WAIT_POLICY=PASSIVE python bench/pruning.py [--threads 2] [--repeats 11]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

from autocompress.costs import compare_latency  # noqa: E402
from autocompress.technique import ApplyContext, TechniqueSettings  # noqa: E402
from autocompress_pruning import PruningTechnique, head_counts, mlp_widths  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRUNING = PruningTechnique()


def demo_kwargs() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "examples" / "fashion_mnist.yaml").read_text())
    return dict(config["model"]["kwargs"])


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sweep(num_heads: int) -> list[tuple[str, float, float]]:
    """(sweep name, heads fraction kept, MLP fraction kept): every head count, four MLP widths, and both together."""
    head_fracs = [round(k / num_heads + 0.004, 2) for k in range(num_heads - 1, 0, -1)]  # 0.67, 0.34 for 3 heads
    rows = [("heads", f, 1.0) for f in head_fracs]
    rows += [("mlp", 1.0, f) for f in (0.75, 0.5, 0.25)]
    half = min(head_fracs, key=lambda f: abs(f - 0.5))
    rows += [("both", head_fracs[0], 0.75), ("both", half, 0.5), ("both", head_fracs[-1], 0.25)]
    return rows


def pruned_models(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, tuple[str, float, float]]]:
    blocks = PRUNING.candidate_layers(model)
    first = model.get_submodule(blocks[0])
    models: dict[str, nn.Module] = {"dense": model}
    labels: dict[str, tuple[str, float, float]] = {"dense": ("dense", 1.0, 1.0)}
    for kind, heads, mlp in sweep(first.attn.num_heads):
        settings = TechniqueSettings({b: {"heads": heads, "mlp": mlp} for b in blocks})
        name = f"{kind} h={heads:g} mlp={mlp:g}"
        models[name] = PRUNING.apply(copy.deepcopy(model), settings, ApplyContext(structure_only=True)).eval()
        labels[name] = (kind, heads, mlp)
    return models, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
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
        models, labels = pruned_models(model)
        blocks = PRUNING.candidate_layers(model)
        heads0 = head_counts(model)[blocks[0]]
        width0 = mlp_widths(model)[blocks[0]]
        lat = compare_latency(models, x, threads=args.threads, warmup=1, repeats=args.repeats)
        base_ms, base_params = lat["dense"].median_ms, params(model)
        rows = []
        for name, l in lat.items():
            kind, h, m = labels[name]
            pruned = models[name]
            heads = head_counts(pruned)[blocks[0]]
            width = mlp_widths(pruned)[blocks[0]]
            rows.append({
                "sweep": kind, "heads_fraction": h, "mlp_fraction": m, "heads": heads, "mlp_width": width,
                "heads_pruned": 1 - heads / heads0, "mlp_pruned": 1 - width / width0,
                "params": params(pruned), "params_ratio": params(pruned) / base_params,
                "median_ms": l.median_ms, "speedup": base_ms / l.median_ms, "latency_ratio": l.median_ms / base_ms,
                "spread": l.spread,
            })
        print(f"\n### {label}, {args.threads} threads, {len(blocks)} blocks pruned alike "
              f"({heads0} heads, MLP width {width0} dense)\n")
        print(markdown_table(
            ["sweep", "heads kept", "MLP width", "heads pruned", "MLP pruned", "params ratio", "median ms",
             "latency ratio", "speedup", "IQR/median"],
            [(r["sweep"], f"{r['heads']}/{heads0}", f"{r['mlp_width']}/{width0}", r["heads_pruned"], r["mlp_pruned"],
              r["params_ratio"], r["median_ms"], r["latency_ratio"], r["speedup"], r["spread"]) for r in rows]))
        results[label] = {"batch": int(x.shape[0]), "blocks": len(blocks), "heads": heads0, "mlp_width": width0,
                          "rows": rows}
    path = write_json("pruning", {"threads": args.threads, "repeats": args.repeats, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

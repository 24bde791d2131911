"""Token merging on a trained Fashion-MNIST ViT: test accuracy and measured latency for several ``r``.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=examples/tome_plugin/src .venv/bin/python examples/tome_plugin/bench_tome.py

The model is the demo's small ViT (width 96, depth 6, 3 heads) with 4x4 patches: 49 patch tokens plus the class
token, so that there are tokens to merge (the demo's 7x7 patches leave only 16). It is trained once (a few minutes
on 2 cores) and cached under ``checkpoints/``. Each ``r`` merges that many tokens in every block, without any
training; latency is timed interleaved with the dense model (A B A B ...) on the target's threads and batch, so
machine load hits both alike. The table it prints is the one in this folder's README.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from autocompress.costs import compare_latency
from autocompress.data import load_fashion_mnist
from autocompress.evaluate import accuracy
from autocompress.models import create_model, load_checkpoint
from autocompress.technique import ApplyContext, TechniqueSettings

from autocompress_tome import TokenMergingTechnique

ROOT = Path(__file__).resolve().parents[2]
KWARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3)


def tokens_per_block(model: torch.nn.Module, r: int) -> list[int]:
    """Tokens entering each block's MLP when ``r`` are merged per block (after clamping), class token included."""
    n, out, protected = model.patch_embed.num_patches + model.num_prefix_tokens, [], model.num_prefix_tokens
    for _ in model.blocks:
        n -= min(r, (n - protected) // 2)
        out.append(n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "fashion_mnist_vit_p4.pt"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--r", default="0,2,4,6,8,12")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_fashion_mnist(args.data, val_size=5000, seed=0)
    model = create_model("vit_tiny_patch16_224", KWARGS)
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        from autocompress.train import train_base

        train_base(model, data, ckpt, epochs=args.epochs, lr=2e-3, batch_size=128)
    model = load_checkpoint(model, ckpt).eval()

    tome = TokenMergingTechnique()
    blocks = tome.candidate_layers(model)
    base_acc = accuracy(model, data.test)
    example = data.val.images[: args.batch]
    rows = []
    for r in [int(v) for v in args.r.split(",")]:
        merged = tome.apply(create_model("vit_tiny_patch16_224", KWARGS), TechniqueSettings(
            layers={b: {"r": r} for b in blocks}), ApplyContext(structure_only=True))
        merged.load_state_dict(model.state_dict())
        merged.eval()
        acc = accuracy(merged, data.test)
        timing = compare_latency({"dense": model, "tome": merged}, example, threads=args.threads, warmup=3,
                                 repeats=args.repeats)
        rows.append({
            "r": r, "tokens_last_block": tokens_per_block(model, r)[-1], "test_accuracy": acc,
            "drop_points": 100 * (base_acc - acc), "dense_ms": timing["dense"].median_ms,
            "tome_ms": timing["tome"].median_ms, "speedup": timing["dense"].median_ms / timing["tome"].median_ms,
        })
        print(f"r={r}: acc {acc:.4f}  {rows[-1]['speedup']:.2f}x", flush=True)

    print(f"\n{platform.processor() or 'cpu'}, torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"uncompressed test accuracy {base_acc:.4f} (10000 images)\n")
    print("| r per block | tokens after last merge | test acc | drop (points) | dense ms | ToMe ms | speedup |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['r']} | {row['tokens_last_block']} | {row['test_accuracy']:.4f} | {row['drop_points']:.2f} | "
              f"{row['dense_ms']:.1f} | {row['tome_ms']:.1f} | {row['speedup']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"base_test_accuracy": base_acc, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

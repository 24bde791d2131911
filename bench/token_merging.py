"""Token merging (the third-party ToMe plugin in examples/tome_plugin): measured latency vs tokens merged per block.

ToMe is an outside distribution; here it is imported from its source folder (``examples/tome_plugin/src``) so the
benchmark needs no install. For DeiT-S (224x224, 196 patch tokens, batch 8) and the demo ViT (examples/
fashion_mnist.yaml: 7x7 patches, 16 patch tokens, batch 256), every block merges ``r`` tokens; each ``r`` is timed
interleaved with the dense model (A B C ...), median of the repeats. Random weights: latency does not depend on them.
Accuracy on trained weights is in examples/tome_plugin/README.md (bench_tome.py).

    python bench/token_merging.py [--threads 2] [--repeats 11]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples" / "tome_plugin" / "src"))
from common import markdown_table, write_json  # noqa: E402

from autocompress.costs import compare_latency  # noqa: E402
from autocompress.models import create_model  # noqa: E402
from autocompress.technique import ApplyContext, TechniqueSettings  # noqa: E402
from autocompress_tome import TokenMergingTechnique  # noqa: E402

TOME = TokenMergingTechnique()


def tokens_after(model: torch.nn.Module, r: int) -> int:
    """Tokens left after the last block's merge (class token included), ``r`` clamped as the plugin does."""
    n, protected = model.patch_embed.num_patches + model.num_prefix_tokens, model.num_prefix_tokens
    for _ in model.blocks:
        n -= min(r, (n - protected) // 2)
    return n


def bench_model(label: str, name: str, kwargs: dict[str, Any], example: torch.Tensor, rs: list[int],
                threads: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    dense = create_model(name, kwargs).eval()
    blocks = TOME.candidate_layers(dense)
    models = {"dense": dense}
    for r in rs:
        merged = TOME.apply(create_model(name, kwargs), TechniqueSettings(layers={b: {"r": r} for b in blocks}),
                            ApplyContext(structure_only=True))
        merged.load_state_dict(dense.state_dict())
        models[f"r={r}"] = merged.eval()
    timing = compare_latency(models, example, threads=threads, warmup=3, repeats=repeats)
    base = timing["dense"].median_ms
    tokens = dense.patch_embed.num_patches + dense.num_prefix_tokens
    rows = [{"r": 0, "tokens_after_last_block": tokens, "median_ms": base, "speedup": 1.0,
             "iqr_over_median": timing["dense"].spread}]
    for r in rs:
        t = timing[f"r={r}"]
        rows.append({"r": r, "tokens_after_last_block": tokens_after(dense, r), "median_ms": t.median_ms,
                     "speedup": base / t.median_ms, "iqr_over_median": t.spread})
    print(f"\n### {label}, {threads} threads, {len(blocks)} blocks, {tokens} tokens in\n")
    print(markdown_table(["r per block", "tokens after last block", "median ms", "speedup", "IQR/median"],
                         [[r["r"], r["tokens_after_last_block"], r["median_ms"], r["speedup"], r["iqr_over_median"]]
                          for r in rows]), flush=True)
    return {"model": label, "batch": int(example.shape[0]), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    demo = yaml.safe_load((ROOT / "examples" / "fashion_mnist.yaml").read_text())
    g = torch.Generator().manual_seed(0)
    results = {
        "deit": bench_model("DeiT-S (224x224, batch 8)", "deit_small_patch16_224", {},
                            torch.randn(8, 3, 224, 224, generator=g), [4, 8, 13, 16], args.threads, args.repeats),
        "demo": bench_model("demo ViT (28x28, batch 256)", demo["model"]["name"], demo["model"]["kwargs"],
                            torch.randn(256, 1, 28, 28, generator=g), [1, 2, 4], args.threads, args.repeats),
    }
    path = write_json("token_merging", {"threads": args.threads, "repeats": args.repeats, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

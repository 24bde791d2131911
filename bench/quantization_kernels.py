"""Which int8/bf16 kernels are really faster on this CPU? Measured, not assumed.

Compares, on the demo ViT (Fashion-MNIST shape, batch 256) and the DeiT-S architecture (224x224, batch 8), all
block Linears in one format: fp32; bf16 (our Bf16Linear); torch's dynamic int8 kernel (our DynamicInt8Linear,
``quantized::linear_dynamic``); torchao's int8 dynamic-activation/int8-weight config; and a simulated 4-bit weight
format (unpacked to fp32: it must not be faster). Interleaved runs, median.

    python bench/quantization_kernels.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

from autocompress.compose import apply_policy  # noqa: E402
from autocompress.costs import compare_latency  # noqa: E402
from autocompress.pluginmanager import load_plugins  # noqa: E402
from autocompress.policy import Policy  # noqa: E402

DEMO = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3)
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def torchao_int8(model: torch.nn.Module) -> torch.nn.Module | None:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception as exc:  # torchao missing or incompatible
        print(f"torchao unavailable: {exc}")
        return None
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, Int8DynamicActivationInt8WeightConfig(),
                  filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name.startswith("blocks."))
    return model


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    techniques = load_plugins().techniques
    names = [f"blocks.{i}.{l}" for i in range(len(model.blocks)) for l in BLOCK_LINEARS]
    out = {"fp32": model}
    for fmt in ("bf16", "int8_dynamic", "int4_weight"):
        policy = Policy.from_params({f"{n}:quantization.format": fmt for n in names})
        out[fmt] = apply_policy(model, policy, techniques)
    ao = torchao_int8(model)
    if ao is not None:
        out["torchao_int8_dyn"] = ao
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = {
        "demo ViT (28x28, batch 256)": (timm.create_model("vit_tiny_patch16_224", pretrained=False, **DEMO).eval(),
                                        torch.randn(256, 1, 28, 28)),
        "DeiT-S (224x224, batch 8)": (timm.create_model("deit_small_patch16_224", pretrained=False).eval(),
                                      torch.randn(8, 3, 224, 224)),
    }
    results = {}
    for label, (model, x) in cases.items():
        lat = compare_latency(variants(model), x, threads=args.threads, warmup=3, repeats=args.repeats)
        base = lat["fp32"].median_ms
        rows = [(name, l.median_ms, base / l.median_ms, "simulated" if name == "int4_weight" else "real")
                for name, l in lat.items()]
        print(f"\n### {label}, {args.threads} threads\n")
        print(markdown_table(["format (all block Linears)", "median ms", "speedup vs fp32", "kernel"], rows))
        results[label] = {name: {"median_ms": l.median_ms, "speedup": base / l.median_ms} for name, l in lat.items()}
    path = write_json("quantization_kernels", {"threads": args.threads, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

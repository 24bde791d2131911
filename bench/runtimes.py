"""What each runtime makes of each compression choice, on this CPU: the kernels table of issue #16, measured.

For the demo ViT (Fashion-MNIST shape, batch 256; its checkpoint if there is one) and the DeiT-S architecture
(224x224, batch 8, random weights: timings do not depend on weight values), every block in one setting: fp32, int8
(torch: dynamic int8 kernels; ONNX Runtime / OpenVINO: the QDQ int8 `autocompress export` writes), bf16 (torch only:
neither export path takes it), low rank 0.5 and 0.25 of every block Linear, MLP pruning to 50% and 25%, one head of
three (demo) / two of six (DeiT-S) pruned. Each model is prepared by its runtime exactly as a search with
`target.runtime` prepares it, and timed in the same rounds as the uncompressed model prepared in that runtime
(paired ratios, median), and as absolute ms; "vs torch fp32" divides by torch eager's uncompressed time measured
in the same process.

    python bench/runtimes.py [--threads 2] [--repeats 15] [--models demo,deit_s] [--runtimes torch,onnxruntime,openvino]

Run it alone (OMP_WAIT_POLICY=PASSIVE): two processes timing at once ruin both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_json  # noqa: E402

from autocompress.compose import apply_policy  # noqa: E402
from autocompress.costs import measure_latency, paired_ratio  # noqa: E402
from autocompress.errors import InputError  # noqa: E402
from autocompress.export import int8_weight_type  # noqa: E402
from autocompress.models import load_checkpoint  # noqa: E402
from autocompress.pluginmanager import load_plugins  # noqa: E402
from autocompress.policy import Policy  # noqa: E402
from autocompress.runtime import check_runtime  # noqa: E402
from autocompress.technique import ApplyContext  # noqa: E402

DEMO = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3)
CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "fashion_mnist_vit.pt"
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def models() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    demo = timm.create_model("vit_tiny_patch16_224", pretrained=False, **DEMO).eval()
    if CHECKPOINT.is_file():
        load_checkpoint(demo, CHECKPOINT)
    deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    torch.manual_seed(0)
    return {"demo": (demo, torch.randn(256, 1, 28, 28)), "deit_s": (deit, torch.randn(8, 3, 224, 224))}


def settings(model: torch.nn.Module) -> dict[str, dict]:
    blocks = range(len(model.blocks))
    linears = [f"blocks.{b}.{l}" for b in blocks for l in BLOCK_LINEARS]
    heads = model.blocks[0].attn.num_heads
    keep = (heads - max(1, heads // 3)) / heads
    return {
        "int8": {f"{n}:quantization.format": "int8_dynamic" for n in linears},
        "bf16": {f"{n}:quantization.format": "bf16" for n in linears},
        "low rank 0.5": {f"{n}:lowrank.rank": 0.5 for n in linears},
        "low rank 0.25": {f"{n}:lowrank.rank": 0.25 for n in linears},
        "MLP 50%": {f"blocks.{b}:pruning.mlp": 0.5 for b in blocks},
        "MLP 25%": {f"blocks.{b}:pruning.mlp": 0.25 for b in blocks},
        f"heads {round(keep * heads)}/{heads}": {f"blocks.{b}:pruning.heads": keep for b in blocks},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", default="demo,deit_s")
    parser.add_argument("--runtimes", default="torch,onnxruntime,openvino")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plugins = load_plugins()
    runtimes = [check_runtime(plugins, name, "--runtimes") for name in args.runtimes.split(",")]
    chosen = {k: v for k, v in models().items() if k in args.models.split(",")}
    print(f"machine: {machine()['cpu_kind']} ({machine()['cpu']}), {args.threads} threads")
    rows, records = [], []
    for model_name, (model, example) in chosen.items():
        torch_ms = min(measure_latency(model, example, args.threads, 3, args.repeats).median_ms for _ in range(3))
        realised = {"fp32": model}
        for label, params in settings(model).items():
            realised[label] = apply_policy(model, Policy.from_params(params), plugins.techniques,
                                           ApplyContext(structure_only=True))
        for runtime in runtimes:
            started = time.perf_counter()
            reference = runtime.prepare(model, example, args.threads, plugins)
            base_ms = min(measure_latency(reference, example, args.threads, 3, args.repeats).median_ms
                          for _ in range(3))
            for label, candidate in realised.items():
                record = {"model": model_name, "runtime": runtime.name, "setting": label}
                try:
                    prepared = reference if label == "fp32" else runtime.prepare(candidate, example, args.threads,
                                                                                 plugins)
                except InputError as exc:
                    record["refused"] = exc.message
                    rows.append([model_name, runtime.name, label, "-", "-", "-", exc.message[:60]])
                    records.append(record)
                    continue
                ratio = 1.0 if label == "fp32" else paired_ratio(reference, prepared, example, args.threads, 3,
                                                                 args.repeats).median_ms
                ms = base_ms * ratio
                record.update(ms=ms, speedup_in_runtime=1 / ratio, speedup_vs_torch_fp32=torch_ms / ms)
                records.append(record)
                rows.append([model_name, runtime.name, label, round(ms, 2), f"{1 / ratio:.2f}x",
                             f"{torch_ms / ms:.2f}x", ""])
            print(f"{model_name} in {runtime.name}: {time.perf_counter() - started:.0f} s", flush=True)
    table = markdown_table(["model", "runtime", "setting", "ms", "speed-up in runtime", "vs torch fp32", "note"], rows)
    print(table)
    weights, why = int8_weight_type()
    path = write_json("runtimes", {"threads": args.threads, "repeats": args.repeats, "results": records,
                                   "int8_weights": weights,
                                   "runtimes": {r.name: r.version() for r in runtimes}})
    path.with_suffix(".md").write_text(f"# Runtimes on {machine()['cpu_kind']} ({machine()['cpu']}), "
                                       f"{args.threads} threads, {machine()['date']}\n\nint8 files: weights "
                                       f"{why}\n\n{table}\n")
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()

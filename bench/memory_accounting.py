"""Memory accounting: the memory a search reports for a policy against the bytes of the compressed model on disk.

    python bench/memory_accounting.py [--policies 50] [--models demo deit]

For N random policies of the builtin space (search_spaces/vit.yaml; recovery training left out: it changes weights,
not their size) on the demo ViT and the DeiT-S architecture (random weights): compress the model as a trial does,
take the ``memory_mb`` the search would report, save it with ``autocompress apply``'s writer (``save_compressed``:
a ``torch.save`` zip holding the state dict and the policy) and compare with the file's size, and with the tensor
bytes of the same state dict written as safetensors (headers excluded). Target: error <= 2%.

No timing here: the numbers do not depend on machine load.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402
from latency_model import fake_data, model_specs  # noqa: E402

from autocompress.budget import Budget  # noqa: E402
from autocompress.compose import save_compressed  # noqa: E402
from autocompress.config import RunConfig, TargetConfig  # noqa: E402
from autocompress.costs import memory_mb  # noqa: E402
from autocompress.models import create_model  # noqa: E402
from autocompress.pluginmanager import load_plugins  # noqa: E402
from autocompress.runner import Baseline, RunContext  # noqa: E402
from autocompress.space import SearchSpace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def safetensors_payload_bytes(state: dict[str, Any]) -> int | None:
    """Bytes of the tensors in a safetensors file of ``state`` (file size minus its JSON header)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        return None
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        save_file(tensors, str(path))
        raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    return len(raw) - 8 - header


def bench_model(key: str, spec: dict[str, Any], n_policies: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(spec["name"], spec["kwargs"]).eval()
    plugins = load_plugins()
    space = SearchSpace.load(ROOT / "search_spaces" / "vit.yaml").resolve(model, plugins.techniques)
    data = fake_data(spec["shape"], spec["classes"])
    example = data.val.images[:2]
    config = RunConfig(target=TargetConfig(threads=2, batch_size=2, warmup=0, repeats=1))
    config.model.name, config.model.kwargs = spec["name"], spec["kwargs"]
    config.data.train_subset, config.data.calibration_size = 64, 32
    run = RunContext(config, plugins, model, data, space, Budget.parse("memory_mb=1e9"), example,
                     Baseline(0.0, memory_mb(model), 0.0))
    rng = random.Random(seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_policies + 1):
            if i == 0:  # the uncompressed model first
                params = {d.name: d.identity for d in space.dimensions}
            else:
                params = {d.name: (d.identity if d.technique == "distillation" else rng.choice(d.choices))
                          for d in space.dimensions}
            policy = run.policy(params)
            compressed = run.compress(policy, seed=i)
            reported = memory_mb(compressed) * 1e6
            path = Path(tmp) / f"{i}.pt"
            save_compressed(path, compressed, policy, spec["name"], spec["kwargs"])
            on_disk = path.stat().st_size
            tensors = safetensors_payload_bytes(compressed.state_dict())
            rows.append({"policy": i, "reported_bytes": int(reported), "file_bytes": on_disk,
                         "safetensors_tensor_bytes": tensors,
                         "error_vs_file": (reported - on_disk) / on_disk,
                         "error_vs_tensors": None if tensors is None else (reported - tensors) / tensors,
                         "summary": policy.summary()})
            r = rows[-1]
            print(f"  {key} {i}/{n_policies}: reported {reported / 1e6:.3f} MB, file {on_disk / 1e6:.3f} MB "
                  f"({100 * r['error_vs_file']:+.2f}%)", flush=True)
    errors = [abs(r["error_vs_file"]) for r in rows]
    tensor_errors = [abs(r["error_vs_tensors"]) for r in rows if r["error_vs_tensors"] is not None]
    return {
        "model": spec["label"], "policies": n_policies,
        "median_abs_error_vs_file": statistics.median(errors), "max_abs_error_vs_file": max(errors),
        "max_abs_error_vs_tensors": max(tensor_errors) if tensor_errors else None,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=50)
    parser.add_argument("--models", nargs="+", default=["demo", "deit"], choices=["demo", "deit"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    specs = model_specs()
    results = {key: bench_model(key, specs[key], args.policies, args.seed) for key in args.models}
    headers = ["model", "policies", "median |error| vs file", "max |error| vs file", "max |error| vs tensor bytes",
               "uncompressed: reported / file MB", "smallest policy: reported / file MB"]
    rows = []
    for r in results.values():
        first = r["rows"][0]
        small = min(r["rows"], key=lambda x: x["file_bytes"])
        rows.append([r["model"], r["policies"], f"{100 * r['median_abs_error_vs_file']:.2f}%",
                     f"{100 * r['max_abs_error_vs_file']:.2f}%",
                     "-" if r["max_abs_error_vs_tensors"] is None else f"{100 * r['max_abs_error_vs_tensors']:.2f}%",
                     f"{first['reported_bytes'] / 1e6:.3f} / {first['file_bytes'] / 1e6:.3f}",
                     f"{small['reported_bytes'] / 1e6:.3f} / {small['file_bytes'] / 1e6:.3f}"])
    print("\n### memory accounting (target: error <= 2%)\n")
    print(markdown_table(headers, rows))
    path = write_json("memory_accounting", {"results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

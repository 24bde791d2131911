"""The builtin technique plugins meet the same contract a third-party plugin is held to (autocompress.testing)."""

from __future__ import annotations

from autocompress_distillation import DistillationTechnique
from autocompress_quantization import QuantizationTechnique

from autocompress.cpu import slow_bf16_reason
from autocompress.testing import ModelSpec, SpeedupClaim, TechniqueContract
from autocompress.technique import TechniqueSettings

BLOCK_LINEARS = "re:blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.(fc1|fc2))"

#: big enough that bf16's gain over fp32 on a CPU with bf16 GEMMs is far above timing noise
DEIT_SMALL_ISH = ModelSpec("vit-w384-d2-64tok", "vit_small_patch16_224",
                           dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, depth=2), batch=8)


def _all_block_linears(fmt: str):
    def settings(model) -> TechniqueSettings:
        names = [n for n, _ in model.named_modules() if n.startswith("blocks.") and n.endswith(("qkv", "proj", "fc1", "fc2"))]
        return TechniqueSettings(layers={n: {"format": fmt} for n in names})

    return settings


class TestQuantizationContract(TechniqueContract):
    technique = QuantizationTechnique()
    plugin = "quantization"
    space = {
        "layers": [
            {"match": BLOCK_LINEARS, "format": ["fp32", "bf16", "int8_dynamic", "int8_weight", "int4_weight", "int2_weight"]},
            {"match": "head", "format": ["fp32", "bf16", "int8_weight"]},
        ]
    }
    atol = 1e-5
    # measured, not assumed: bf16 pays only where this CPU's bf16 GEMM is faster (AVX-512 bf16 / AMX)
    speedups = [SpeedupClaim("bf16-block-linears", DEIT_SMALL_ISH, _all_block_linears("bf16"), batch=16,
                             min_speedup=1.0, requires=slow_bf16_reason)]


class TestDistillationContract(TechniqueContract):
    """Options only (no per-layer knobs); a few training steps on the contract's small random training set."""

    technique = DistillationTechnique()
    plugin = "distillation"
    space = {"options": {"steps": [0, 3], "temperature": [2.0, 4.0], "alpha": [0.5, 1.0], "lr": [1e-3],
                         "feature_weight": [0.0, 0.5], "batch_size": [16]}}
    atol = 1e-5


def test_every_builtin_plugin_is_held_to_the_contract() -> None:
    """Each builtin plugin has a TechniqueContract subclass naming it (here or in its own test file, e.g.
    TestLowRankContract in test_lowrank.py), so a new builtin cannot skip the contract."""
    import ast
    import importlib.metadata
    from pathlib import Path

    covered = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) == "TechniqueContract" for b in node.bases):
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "plugin" for t in stmt.targets)
                            and isinstance(stmt.value, ast.Constant)):
                        covered.add(stmt.value.value)
    builtins = {ep.name for ep in importlib.metadata.entry_points(group="autocompress")
                if ep.dist is not None and ep.dist.name == "autocompress"}
    assert builtins >= {"quantization"}
    assert builtins <= covered, f"builtin plugins without a contract test: {sorted(builtins - covered)}"

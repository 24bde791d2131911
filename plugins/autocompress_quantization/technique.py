"""The quantization technique: one numeric format per Linear layer, addressed by module name."""

from __future__ import annotations

from torch import nn

from autocompress.technique import (
    ApplyContext,
    Stage,
    Technique,
    TechniqueSettings,
    get_submodule_parent,
    replace_module,
)

from autocompress_quantization.modules import (
    Bf16Linear,
    DynamicInt8Linear,
    PackedIntWeightLinear,
    bf16_activations,
    let_parent_call,
)

#: format name -> True when it has a real kernel here
FORMATS = {"fp32": True, "bf16": True, "int8_dynamic": True, **{f"int{k}_weight": False for k in range(2, 9)}}


def convert_linear(linear: nn.Linear, fmt: str) -> nn.Module:
    if fmt == "fp32":
        return linear
    if fmt == "bf16":
        return Bf16Linear.from_linear(linear)
    if fmt == "int8_dynamic":
        return DynamicInt8Linear.from_linear(linear)
    if fmt.startswith("int") and fmt.endswith("_weight"):
        return PackedIntWeightLinear.from_linear(linear, int(fmt[3:-7]))
    raise ValueError(f"unknown format {fmt!r}")


class QuantizationTechnique(Technique):
    name = "quantization"
    stage = Stage.FORMAT
    layer_knobs = {"format": "fp32"}
    #: dtype of the activations between layers; "bf16" also runs norms, attention and embeddings in bf16
    global_knobs = {"compute": "fp32"}

    def candidate_layers(self, model: nn.Module) -> list[str]:
        return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]

    def check_value(self, model: nn.Module, layer: str | None, knob: str, value: object) -> None:
        if not isinstance(value, str):
            raise ValueError(f"must be a format name, got {type(value).__name__}")
        if knob == "compute":
            if value not in ("fp32", "bf16"):
                raise ValueError("compute must be fp32 or bf16")
            return
        if value not in FORMATS:
            raise ValueError(f"unknown format (known: {', '.join(FORMATS)})")

    def apply(self, model: nn.Module, settings: TechniqueSettings, ctx: ApplyContext) -> nn.Module:
        for layer, knobs in settings.layers.items():
            fmt = knobs.get("format", "fp32")
            if fmt == "fp32":
                continue
            target = model.get_submodule(layer)
            if isinstance(target, nn.Linear):
                replace_module(model, layer, convert_linear(target, fmt))
                let_parent_call(*get_submodule_parent(model, layer))
                continue
            # An earlier technique replaced the layer by a composite (e.g. two low-rank factors): convert its parts.
            inner = [n for n, m in target.named_modules() if isinstance(m, nn.Linear) and n]
            if not inner:
                raise ValueError(f"{layer} is a {type(target).__name__} with no Linear to quantize")
            for sub in inner:
                replace_module(target, sub, convert_linear(target.get_submodule(sub), fmt))
        if settings.options.get("compute", "fp32") == "bf16":
            bf16_activations(model)
        return model

    def simulated_layers(self, settings: TechniqueSettings) -> list[str]:
        return [layer for layer, knobs in settings.layers.items() if not FORMATS.get(knobs.get("format", "fp32"), True)]

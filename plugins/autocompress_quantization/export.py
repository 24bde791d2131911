"""What the quantization formats become in an exported file.

``int8_dynamic`` layers become plain Linears holding the dequantized int8 weights, declared int8: the exporter
quantizes them again in the file's own int8 operators with the same per-channel scales. ``fp32`` layers are plain
Linears already. ``bf16`` (and ``compute: bf16``) and the simulated ``int{k}_weight`` formats have no export path
here, so the layer is refused, naming its format.
"""

from __future__ import annotations

import torch
from torch import nn

from autocompress.technique import replace_module

from autocompress_quantization.modules import Bf16Linear, DynamicInt8Linear, Fp32Linear, PackedIntWeightLinear

EXPORTABLE = "fp32, int8_dynamic"


def prepare_export(model: nn.Module, plan) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, DynamicInt8Linear):
            replace_module(model, name, _plain_linear(module))
            plan.int8(name)
        elif isinstance(module, Bf16Linear):
            plan.refuse(name, f"format bf16 has no {plan.target} export (exportable: {EXPORTABLE})")
        elif isinstance(module, PackedIntWeightLinear):
            plan.refuse(name, f"format int{module.bits}_weight is simulated (no kernel) and has no {plan.target} "
                              f"export (exportable: {EXPORTABLE})")
        elif isinstance(module, Fp32Linear):
            plan.refuse(name, f"quantization option compute: bf16 has no {plan.target} export (use compute: fp32)")
    if not plan.refused and any(p.dtype == torch.bfloat16 for p in model.parameters()):
        plan.refuse("quantization.options.compute", f"bf16 has no {plan.target} export (use compute: fp32)")


def _plain_linear(module: DynamicInt8Linear) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(module.dequantized_weight())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear

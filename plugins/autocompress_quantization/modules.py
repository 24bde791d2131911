"""Linear layers in other numeric formats. Each keeps in its state dict exactly what it would be saved with.

- ``Bf16Linear``: bf16 weights and a bf16 GEMM (oneDNN/AMX or AVX512-BF16 kernels on CPUs that have them).
- ``DynamicInt8Linear``: int8 per-channel weights, activations quantized per call; runs the fbgemm/x86 kernel
  ``quantized::linear_dynamic``. Chosen over torchao's int8 dynamic-activation config because it measured faster
  here (see ``bench/quantization_kernels.py``).
- ``PackedIntWeightLinear``: k-bit (2..8) per-channel weights, bit-packed. There is no k-bit kernel on CPU: the
  weight is unpacked to fp32 for the GEMM, so it saves memory but never time. It is reported as ``simulated``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class Bf16Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Bf16Linear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None)
        new.weight.copy_(linear.weight.detach())
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format=bf16"


class DynamicInt8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None
        self.register_load_state_dict_post_hook(lambda module, _: module._repack())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DynamicInt8Linear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        new.qweight.copy_(torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8))
        new.scale.copy_(scale)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        new._repack()
        return new

    def _repack(self) -> None:
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        # torch deprecates its quantized tensor types in favour of torchao, but this is still the int8 CPU kernel
        # that measured fastest here (bench/quantization_kernels.py); the warning would repeat at every trial.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qw = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(), zero_points, 0)
        self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._repack()
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, True).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format=int8_dynamic"


class Fp32Linear(nn.Module):
    """An fp32 Linear inside a model whose activations flow in bf16: casts in and out around the fp32 GEMM."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.inner = linear
        # like every converted Linear, it tells its shape (what counts read, e.g. the pruning plugin's mlp_widths)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)




def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers below ``2**bits`` into a uint8 tensor of ``ceil(n * bits / 8)`` bytes."""
    flat = values.reshape(-1).to(torch.int32)
    planes = (flat.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int32)) & 1  # n x bits, LSB first
    stream = planes.reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = 1 << torch.arange(8, dtype=torch.int32)
    return (stream.view(-1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    stream = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    planes = stream.reshape(-1)[: count * bits].view(count, bits)
    return (planes * (1 << torch.arange(bits, dtype=torch.int32))).sum(-1)


class PackedIntWeightLinear(nn.Module):
    """k-bit weight-only quantization, symmetric per output channel. Simulated: no k-bit kernel is used."""

    simulated = True

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be 2..8, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        nbytes = math.ceil(in_features * out_features * bits / 8)
        self.register_buffer("packed", torch.zeros(nbytes, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("_weight", torch.zeros(out_features, in_features), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module._unpack())

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> "PackedIntWeightLinear":
        new = cls(linear.in_features, linear.out_features, bits, linear.bias is not None)
        w = linear.weight.detach().float()
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / qmax
        q = torch.round(w / scale[:, None]).clamp(-qmax - 1, qmax).to(torch.int32)
        new.packed.copy_(pack_bits(q + 2 ** (bits - 1), bits))
        new.scale.copy_(scale)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        new._unpack()
        return new

    def _unpack(self) -> None:
        count = self.in_features * self.out_features
        q = unpack_bits(self.packed, self.bits, count) - 2 ** (self.bits - 1)
        self._weight = q.view(self.out_features, self.in_features).float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format=int{self.bits}_weight (simulated)"


QUANTIZED_MODULES = (Bf16Linear, DynamicInt8Linear, Fp32Linear, PackedIntWeightLinear)


def let_parent_call(parent: nn.Module, attr: str) -> None:
    """Make ``parent`` call its converted ``attr`` module rather than read its weight.

    timm's BEiT and EVA attention add their separate q/k/v biases with ``F.linear(x, qkv.weight, bias)`` unless
    ``qkv_bias_separate`` is set, which bypasses whatever replaced ``qkv`` (it has no fp32 ``weight``). With the flag
    set they call ``qkv`` and add the biases to its output: the same sum.
    """
    if attr == "qkv" and getattr(parent, "q_bias", None) is not None and hasattr(parent, "qkv_bias_separate"):
        parent.qkv_bias_separate = True


def bf16_activations(model: nn.Module) -> None:
    """Run everything that is not a format-converted Linear in bf16: norms, attention, embeddings, residuals.

    Linears left at fp32 are wrapped so they still compute in fp32; the model takes and returns fp32 tensors.
    """
    protected: set[int] = set()
    for module in model.modules():
        if isinstance(module, QUANTIZED_MODULES):
            protected.update(id(m) for m in module.modules())
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and id(module) not in protected:
            wrapper = Fp32Linear(module)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, wrapper)
            let_parent_call(parent, attr)
            protected.update((id(wrapper), id(module)))
    for module in model.modules():
        if id(module) in protected:
            continue
        for param in module.parameters(recurse=False):
            if param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
        for key, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.dtype == torch.float32:
                setattr(module, key, buf.to(torch.bfloat16))
    model.register_forward_pre_hook(_inputs_to_bf16)
    model.register_forward_hook(_output_to_fp32)


def _inputs_to_bf16(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_to_fp32(module: nn.Module, args: tuple, out):
    return out.float() if torch.is_tensor(out) else out

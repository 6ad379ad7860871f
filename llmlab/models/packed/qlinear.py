"""Quantized replacements of nn.Linear, holding real low-bit weights.

`QuantizedLinear` is the base every packed layer derives from (weight-only here; LLM.int8(),
W8A8 and NF4 in their own files); io.py's table from kind to class rebuilds a saved model:
`LAYERS[kind].empty(in, out, bias, **config)` then the file's tensors.

`QuantLinear` ("weight_only") stores the b-bit grid of `quant.py` packed by `bitpack.py`:
    qweight  uint8 (out, ceil(in·b/8))     scales  float32 (out, G)     zeros  uint8 (out, G)
and computes y = x·Ŵᵀ + bias with Ŵ = S·(q − Z). Where this CPU has an integer kernel it uses it,
in a layout made once on the first forward pass and never saved:
    int8, symmetric, per channel  torch._weight_int8pack_mm(x, q − 128, S)           y = (x·(q−128)ᵀ)·S
    int4, groups of 32k           torch._weight_int4pack_mm_for_cpu(x, packed, g, SZ)  w = (q − 8)·S + Z_mid
torch's int4 kernel keeps a float "mid-point" zero, Z_mid = S·(8 − Z), the same grid written
differently. The kernels run on bf16 activations (`kernel_dtype`): on this CPU their fp32 paths
are 10-20x slower than a plain fp32 matmul, their bf16 paths faster; the output is cast back. Everything else (2/3-bit, asymmetric 8-bit, training that needs gradients) takes the
dequantize-and-matmul path, which is also the fake-quant path for research.
"""

from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from llmlab.models.packed.bitpack import pack, packed_width, unpack
from llmlab.models.packed.quant import QuantSpec, dequantize, fit_grid, quantize

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's CPU int4 kernel takes


class QuantizedLinear(nn.Module):
    """Base of every quantized replacement of an nn.Linear: in_features, out_features, bias."""
    kind: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def config(self) -> dict:
        """JSON-able options that rebuild the layer with `empty` (bits, group size, …)."""
        raise NotImplementedError

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, **config) -> "QuantizedLinear":
        return cls(in_features, out_features, bias, **config)

    def dequantized_weight(self) -> Tensor:
        """(out, in) float32: what the layer effectively multiplies by."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {options}"


class QuantLinear(QuantizedLinear):
    """Weight-only RTN/GPTQ/AWQ layer; `QuantLinear.use_kernels = False` forces the dequantize path."""
    kind = "weight_only"  # its name in the packed folder's list of swapped modules
    use_kernels: ClassVar[bool] = True
    kernel_dtype: ClassVar[torch.dtype] = torch.bfloat16  # float32: slow, but the same sums as dequantizing

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int = 4, group_size: int = 128,
                 symmetric: bool = False):
        super().__init__(in_features, out_features, bias)
        self.spec = QuantSpec(bits, group_size, symmetric)
        rows, groups = (1 if group_size == -1 else out_features), self.spec.n_groups(in_features)
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(rows, groups))
        self.register_buffer("zeros", torch.zeros(rows, groups, dtype=torch.uint8))
        self._kernel: dict | None = None  # the kernel's layout, made on first use: never saved

    @classmethod
    def from_float(cls, linear: nn.Module, spec: QuantSpec, q: Tensor | None = None,
                   scale: Tensor | None = None, zero: Tensor | None = None) -> "QuantLinear":
        """Quantize linear.weight by RTN, or take q/scale/zero already solved (GPTQ, AWQ)."""
        weight = linear.weight.detach()
        if isinstance(linear, Conv1D):  # GPT-2 stores its linear weights as (in, out)
            weight = weight.T  # (surgery.linear_weight would import this package: models.packed stays below it)
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, linear.bias is not None, spec.bits, spec.group_size, spec.symmetric)
        if q is None:
            scale, zero = fit_grid(weight, spec)
            q = quantize(weight, scale, zero, spec)
        if q.shape != weight.shape or scale.shape != layer.scales.shape or zero.shape != layer.zeros.shape:
            raise ValueError(f"q {tuple(q.shape)}, scale {tuple(scale.shape)}, zero {tuple(zero.shape)} do not fit a "
                             f"{out_features}x{in_features} weight in groups of {spec.group_size}")
        device = weight.device
        layer.qweight = pack(q.cpu(), spec.bits).to(device)
        layer.scales = scale.detach().float().to(device)
        layer.zeros = zero.detach().round().to(torch.uint8).to(device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def config(self) -> dict:
        return {"bits": self.spec.bits, "group_size": self.spec.group_size, "symmetric": self.spec.symmetric}

    def dequantized_weight(self) -> Tensor:
        q = unpack(self.qweight, self.spec.bits, self.in_features)
        return dequantize(q, self.scales, self.zeros, self.spec)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out), in x's dtype
        kernel = self._kernel_layout() if self._kernel_applies(x) else None
        x2 = x.reshape(-1, self.in_features)
        if kernel is None:
            y = x2 @ self.dequantized_weight().to(x.dtype).T
        else:
            y = self._kernel_matmul(kernel, x2.to(self.kernel_dtype).contiguous()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    @staticmethod
    def _kernel_matmul(kernel: dict, x: Tensor) -> Tensor:  # (M, K) -> (M, N) in x's dtype
        if kernel["kind"] == "int8":
            return torch._weight_int8pack_mm(x, kernel["weight"], _as(kernel, "scales", x.dtype))
        return torch._weight_int4pack_mm_for_cpu(x, kernel["weight"], kernel["group"],
                                                 _as(kernel, "scales_and_zeros", x.dtype))

    def _kernel_applies(self, x: Tensor) -> bool:
        # The kernels have no backward: LoRA on this base needs the gradient with respect to x.
        return (self.use_kernels and x.device.type == "cpu" and x.dtype in KERNEL_DTYPES
                and not (torch.is_grad_enabled() and x.requires_grad) and self._kernel_kind() is not None)

    def _kernel_kind(self) -> str | None:
        spec = self.spec
        if spec.bits == 8 and spec.symmetric and spec.group_size in (0, -1):
            return "int8"
        group = spec.group_for(self.in_features)
        if spec.bits == 4 and self.out_features % 16 == 0 and _int4_group(self.in_features, group):
            return "int4"
        return None

    def _kernel_layout(self) -> dict:
        if self._kernel is None:
            with torch.no_grad():
                self._kernel = _int8_layout(self) if self._kernel_kind() == "int8" else _int4_layout(self)
        return self._kernel

    # The kernel layout is derived from the buffers: drop it whenever they move or are replaced.
    def _apply(self, fn, recurse=True):
        self._kernel = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel = None
        return super()._load_from_state_dict(*args, **kwargs)


def _int4_group(in_features: int, group_size: int) -> int | None:
    """The kernel's group: the largest it takes that divides the format's groups (their scales repeat)."""
    span = in_features if group_size <= 0 else group_size
    return next((g for g in INT4_GROUPS if span % g == 0 and in_features % g == 0), None)


def _int8_layout(layer: QuantLinear) -> dict:
    signed = (layer.qweight.to(torch.int16) - 128).to(torch.int8)  # (N, K): the stored grid has Z = 128
    return {"kind": "int8", "weight": signed, "scales": layer.scales.float().expand(layer.out_features, 1)[:, 0].contiguous()}


def _int4_layout(layer: QuantLinear) -> dict:
    group = _int4_group(layer.in_features, layer.spec.group_for(layer.in_features))
    q = unpack(layer.qweight, 4, layer.in_features).to(torch.int32)  # (N, K)
    repeat = layer.in_features // group // layer.scales.shape[1]  # kernel groups per stored group
    scales = layer.scales.float().expand(layer.out_features, -1).repeat_interleave(repeat, dim=1)  # (N, K/g)
    zeros = layer.zeros.float().expand(layer.out_features, -1).repeat_interleave(repeat, dim=1)
    mid = scales * (8 - zeros)  # S·(q − Z) = (q − 8)·S + S·(8 − Z)
    return {"kind": "int4", "group": group, "weight": torch._convert_weight_to_int4pack_for_cpu(q, 1),
            "scales_and_zeros": torch.stack([scales, mid], -1).transpose(0, 1).contiguous()}  # (K/g, N, 2)


def _as(kernel: dict, key: str, dtype: torch.dtype) -> Tensor:
    """The kernel's scales in the activations' dtype, converted once per dtype."""
    cached = kernel.setdefault(dtype, {})
    if key not in cached:
        cached[key] = kernel[key].to(dtype)
    return cached[key]


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    """name -> module for every quantized layer of the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}

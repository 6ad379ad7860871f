"""The NF4 layer of QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): 4-bit NormalFloat
codes in absmax-scaled blocks, the absmax constants themselves quantized to 8 bits (double quantization).

The quantizer that fills it is llmlab.compress.nf4; this file is the stored format and its forward pass.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.errors import LlmlabError
from llmlab.models.packed.bitpack import pack
from llmlab.models.packed.qlinear import QuantizedLinear

# The NF4 code book as bitsandbytes ships it (create_normal_map(offset=0.9677083, use_extra_value=True)):
# 8 positive quantiles, 7 negative, and 0 — asymmetric so that 0 is exact.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


# byte -> the values of its two codes, first value in the low nibble (packing.pack's order): one
# gather dequantizes two weights, with no unpacking step
PAIRS = torch.stack([NF4[torch.arange(256) & 0xF], NF4[torch.arange(256) >> 4]], -1)  # (256, 2)


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dynamic_code() -> Tensor:
    """bitsandbytes' signed dynamic 8-bit code (create_dynamic_map(signed=True)), sorted, (256,).

    Each byte is a sign, a unary exponent e (10^−e, e = 0…6) and a linear fraction whose width
    shrinks as e grows: fine steps near 0, coarse near ±1, plus 0 and 1.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1)
        means = (edges[:-1] + edges[1:]) / 2.0  # the midpoints of 2^i equal fraction bins
        values += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC = dynamic_code()


def quantize_blockwise(x: Tensor, code: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Absmax-scale each block of `block` consecutive values of x (flattened) and round to the nearest
    code value. Returns (indices uint8 (numel,), absmax float32 (ceil(numel/block),))."""
    flat = x.detach().float().reshape(-1)
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % block)).reshape(-1, block)  # zero padding leaves absmax unchanged
    absmax = blocks.abs().amax(-1)
    # x · (1/absmax), not x / absmax, and bucketize on the midpoints: bitsandbytes' rounding and ties
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    q = torch.bucketize(scaled.reshape(-1)[:n], (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return q, absmax


def dequantize_blockwise(q: Tensor, absmax: Tensor, code: Tensor, block: int) -> Tensor:
    """code[q] · absmax of its block, float32 (numel,)."""
    return scale_blocks(code.to(q.device)[q.long()], absmax, block)


def scale_blocks(values: Tensor, absmax: Tensor, block: int) -> Tensor:
    """values (numel,) times the absmax of their block of `block` consecutive values."""
    n = values.numel()
    if n % block:
        values = F.pad(values, (0, -n % block))
    return (values.view(-1, block) * absmax.float()[:, None]).reshape(-1)[:n]


def check_nf4(block_size: int, dq_block_size: int, compute_dtype: str) -> None:
    for key, value in (("block_size", block_size), ("dq_block_size", dq_block_size)):
        if not isinstance(value, int) or value < 2 or value % 2:
            raise LlmlabError(f"nf4 {key} must be an even integer >= 2, got {value}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise LlmlabError(f"nf4 compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got '{compute_dtype}'")


class NF4Linear(QuantizedLinear):
    """Buffers: qweight uint8 (ceil(out·in/2),) two codes per byte; with double quantization absmax_q
    uint8 (n_blocks,), absmax_scale float32 (ceil(n_blocks/256),), absmax_mean float32 (1,); without,
    absmax float32 (n_blocks,)."""
    kind = "nf4"  # its name in the packed folder's list of swapped modules

    def __init__(self, in_features: int, out_features: int, bias: bool, block_size: int = 64,
                 double_quant: bool = True, dq_block_size: int = 256, compute_dtype: str = "bf16"):
        super().__init__(in_features, out_features, bias)
        check_nf4(block_size, dq_block_size, compute_dtype)
        self.block_size, self.double_quant = block_size, double_quant
        self.dq_block_size, self.compute_dtype = dq_block_size, compute_dtype
        n = in_features * out_features
        blocks = math.ceil(n / block_size)
        self.register_buffer("qweight", torch.zeros((n + 1) // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(blocks, dtype=torch.uint8))
            self.register_buffer("absmax_scale", torch.zeros(math.ceil(blocks / dq_block_size)))
            self.register_buffer("absmax_mean", torch.zeros(1))
        else:
            self.register_buffer("absmax", torch.zeros(blocks))

    @classmethod
    def from_float(cls, linear: nn.Linear, cfg=None) -> "NF4Linear":
        """`cfg`: the options (block_size, double_quant, dq_block_size, compute_dtype), e.g. an NF4Config."""
        options = {k: getattr(cfg, k) for k in ("block_size", "double_quant", "dq_block_size", "compute_dtype")
                   } if cfg is not None else {}
        weight = linear.weight.detach()  # (out, in)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **options).to(weight.device)
        q, absmax = quantize_blockwise(weight, NF4, layer.block_size)
        layer.qweight = pack(q.cpu()[None], 4)[0].to(weight.device)
        if layer.double_quant:
            mean = absmax.mean()
            layer.absmax_q, layer.absmax_scale = quantize_blockwise(absmax - mean, DYNAMIC, layer.dq_block_size)
            layer.absmax_mean = mean.reshape(1)
        else:
            layer.absmax = absmax
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def config(self) -> dict:
        return {"block_size": self.block_size, "double_quant": self.double_quant,
                "dq_block_size": self.dq_block_size, "compute_dtype": self.compute_dtype}

    def block_absmax(self) -> Tensor:
        """c₂ of every block, float32: stored, or rebuilt from the double quantization as DYN[q₂]·c₁ + μ."""
        if not self.double_quant:
            return self.absmax.float()
        return dequantize_blockwise(self.absmax_q, self.absmax_scale, DYNAMIC, self.dq_block_size) + \
            self.absmax_mean.float()

    def dequantized_weight(self) -> Tensor:
        n = self.in_features * self.out_features
        values = PAIRS.to(self.qweight.device)[self.qweight.long()].reshape(-1)[:n]  # NF4[q], (numel,)
        return scale_blocks(values, self.block_absmax(), self.block_size).reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out), in x's dtype
        dtype = COMPUTE_DTYPES[self.compute_dtype]
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantized_weight().to(dtype), bias).to(x.dtype)

    def bits_per_parameter(self) -> float:
        """Storage of the weight (codes and constants, not the bias) in bits per weight."""
        stored = sum(b.numel() * b.element_size() for b in self.buffers())  # the bias is a Parameter
        return 8 * stored / (self.in_features * self.out_features)

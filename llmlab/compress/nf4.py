"""NF4 with double quantization: the 4-bit base of QLoRA (Dettmers et al. 2023).

"QLoRA: Efficient Finetuning of Quantized LLMs", https://arxiv.org/abs/2305.14314, §3.

NormalFloat4 is a code book of 16 values, the quantiles of N(0, 1) scaled to [−1, 1] (with an exact
0), so that each code is used equally often by normally distributed weights. The weight is cut into
blocks of 64 consecutive values (of the flattened (out, in) weight); each block keeps its absmax c₂
and every weight the index of the nearest code:

    q = argmin_j |NF4_j − W / c₂|          Ŵ = NF4[q] · c₂

Double quantization (§3, "Double Quantization") quantizes the fp32 constants c₂ themselves: they
are centred by their mean μ (they are all positive) and quantized to 8 bits in blocks of 256, each
with its own fp32 absmax c₁, on bitsandbytes' signed dynamic 8-bit code (Dettmers 2016, "8-Bit
Approximations for Parallelism in Deep Learning", https://arxiv.org/abs/1511.04561):

    c₂ ≈ DYN[q₂] · c₁ + μ

so the constants cost 8/64 + 32/(64·256) = 0.127 bits per weight instead of 32/64 = 0.5:
4.127 bits per parameter in all. The numbers follow bitsandbytes (the paper's code): the same
code books, blocks (across row ends, the last one partial), rounding and ties, so
`dequantized_weight()` equals `bitsandbytes.functional.dequantize_4bit` of the same tensor; only
bitsandbytes' CPU kernel for the 8-bit constants, an approximate binary search, takes the second
nearest code for a few constants lying right at a midpoint (its torch backend agrees with us). The
nibble order differs: llmlab's `packing` puts the first value in the low nibble.

`NF4Linear.forward` dequantizes to the compute dtype (bf16 by default) and multiplies, as
bitsandbytes does on CPU: the 4-bit weight is storage, the arithmetic is bf16.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlab.compress.calibrate import check_skip, layers_prefix, linears_of, set_module, skipped
from llmlab.compress.packing import pack
from llmlab.compress.qlinear import QuantizedLinear, quantized_linears, register
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers

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


@dataclass
class NF4Config:
    block_size: int = field(64, help="weights per absmax block")
    double_quant: bool = field(True, help="quantize the absmax constants to 8 bits too (blocks of 256)")
    dq_block_size: int = field(256, help="absmax constants per block of the double quantization")
    compute_dtype: str = field("bf16", help="dtype of the matmul: bf16, fp16 or fp32")
    skip: list[str] = field([], help="regexes of full module names to leave in float")

    def __post_init__(self):
        for key in ("block_size", "dq_block_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 2 or getattr(self, key) % 2:
                raise LlmlabError(f"nf4 {key} must be an even integer >= 2, got {getattr(self, key)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise LlmlabError(f"nf4 compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                              f"got '{self.compute_dtype}'")
        check_skip(self.skip)


@register("nf4")
class NF4Linear(QuantizedLinear):
    """Buffers: qweight uint8 (ceil(out·in/2),) two codes per byte; with double quantization absmax_q
    uint8 (n_blocks,), absmax_scale float32 (ceil(n_blocks/256),), absmax_mean float32 (1,); without,
    absmax float32 (n_blocks,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, block_size: int = 64,
                 double_quant: bool = True, dq_block_size: int = 256, compute_dtype: str = "bf16"):
        super().__init__(in_features, out_features, bias)
        NF4Config(block_size, double_quant, dq_block_size, compute_dtype)  # validates
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
    def from_float(cls, linear: nn.Linear, cfg: NF4Config | None = None) -> "NF4Linear":
        cfg = cfg or NF4Config()
        weight = linear.weight.detach()  # (out, in)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, cfg.block_size,
                    cfg.double_quant, cfg.dq_block_size, cfg.compute_dtype).to(weight.device)
        q, absmax = quantize_blockwise(weight, NF4, cfg.block_size)
        layer.qweight = pack(q.cpu()[None], 4)[0].to(weight.device)
        if cfg.double_quant:
            mean = absmax.mean()
            layer.absmax_q, layer.absmax_scale = quantize_blockwise(absmax - mean, DYNAMIC, cfg.dq_block_size)
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


@torch.no_grad()
def quantize_nf4(model, calib=None, cfg: NF4Config | None = None):
    """Replace the decoder layers' linears of `model` by NF4Linear, in place; returns the model.

    `calib` is ignored (NF4 needs no data); embeddings and lm_head stay in float.
    """
    cfg = cfg or NF4Config()
    targets = nf4_targets(model, cfg)  # checked before anything changes
    for index, layer in enumerate(tqdm(decoder_layers(model), desc="nf4", unit="layer", disable=None, leave=False)):
        for name in targets[index]:
            set_module(layer, name, NF4Linear.from_float(layer.get_submodule(name), cfg))
    model.llmlab_quant_method = "nf4"
    return model


def nf4_targets(model, cfg: NF4Config) -> list[list[str]]:
    """For each decoder layer, the relative names of its float linears; LlmlabError if one is already quantized."""
    prefix, targets = layers_prefix(model), []
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in quantized_linears(layer).items():
            if not skipped(f"{prefix}.{index}.{name}", cfg.skip):
                raise LlmlabError(f"{prefix}.{index}.{name} is already quantized ({module.kind}); "
                                  f"quantize the float model instead")
        targets.append([n for n in linears_of(layer) if not skipped(f"{prefix}.{index}.{n}", cfg.skip)])
    return targets


def bits_per_parameter(model) -> float:
    """Bits per weight of all NF4 layers of the model together (≈ 4.127 with double quantization)."""
    layers = [m for m in quantized_linears(model).values() if isinstance(m, NF4Linear)]
    if not layers:
        raise LlmlabError("the model has no NF4 layers; quantize it with quantize_nf4 first")
    weights = sum(m.in_features * m.out_features for m in layers)
    return sum(m.bits_per_parameter() * m.in_features * m.out_features for m in layers) / weights

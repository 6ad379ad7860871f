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

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from llmlab.compress.calibrate import check_skip, layers_prefix, linears_of, skipped
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers
from llmlab.models.packed.nf4 import NF4Linear, check_nf4
from llmlab.models.packed.qlinear import quantized_linears
from llmlab.models.surgery import set_module


@dataclass
class NF4Config:
    block_size: int = field(64, help="weights per absmax block")
    double_quant: bool = field(True, help="quantize the absmax constants to 8 bits too (blocks of 256)")
    dq_block_size: int = field(256, help="absmax constants per block of the double quantization")
    compute_dtype: str = field("bf16", help="dtype of the matmul: bf16, fp16 or fp32")
    skip: list[str] = field([], help="regexes of full module names to leave in float")

    def __post_init__(self):
        check_nf4(self.block_size, self.dq_block_size, self.compute_dtype)
        check_skip(self.skip)


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

"""What other tools load: compressed-tensors for weight-only integer layers, a loud refusal otherwise.

**compressed-tensors** ("pack-quantized", as llm-compressor writes it; transformers loads it with the
`compressed-tensors` package and vLLM serves it). A weight-only layer (RTN, GPTQ, AWQ) is stored as

    weight_packed       int32 (out, ⌈in·b/32⌉)   the unsigned b-bit values q, one little-endian bit stream
                                                 per row: value j at bits [j·b, (j+1)·b)
    weight_scale        (out, G)                 S
    weight_zero_point   int32 (⌈out·b/32⌉, G)    Z, packed the same way down each column (asymmetric only)
    weight_shape        int64 (2,)               (out, in)

with ŵ = S·((q − 2^(b−1)) − (Z − 2^(b−1))) = S·(q − Z): exactly llmlab's grid (a symmetric grid, whose
Z is 2^(b−1), stores no zero point). llmlab's own packing
(bitpack.py) is that same bit stream cut into bytes, so converting is a zero-padding and a view, with
no rounding anywhere. `quantization_config` in config.json has one config group per (bits, group
size, symmetry), each naming its layers.

**Everything else** (NF4, W8A8, LLM.int8() outliers, low-rank and LoRC layers, per-tensor grids) has
no ecosystem format. Such a folder's config.json says `model_type: llmlab_packed`, so transformers
refuses it outright instead of loading random weights, and its `auto_map` points at a two-line
module in the folder that loads it through llmlab (`trust_remote_code=True`, llmlab installed).
"""

import torch
from torch import Tensor

from llmlab.models.packed.bitpack import pack, packed_width, unpack
from llmlab.models.packed.qlinear import QuantLinear

PACKED_TYPE = "llmlab_packed"  # the model_type of folders only llmlab reads
REMOTE_MODULE = "llmlab_packed"  # the module the auto_map names, written beside config.json
REMOTE_CODE = ('"""A folder of llmlab packed layers: transformers loads it through llmlab (pip install llmlab)."""\n\n'
               "from llmlab.models.packed.remote import LlmlabPackedConfig, LlmlabPackedForCausalLM  # noqa: F401\n")


def compressible(modules: dict) -> bool:
    """Whether compressed-tensors can hold every swapped module: weight-only int grids per group or channel."""
    return bool(modules) and all(isinstance(m, QuantLinear) and m.spec.group_size >= 0 and m.spec.bits >= 2
                                 for m in modules.values())


def to_stream_int32(packed_bytes: Tensor) -> Tensor:
    """llmlab's row bytes (out, n) -> compressed-tensors' int32 words (out, ⌈n/4⌉), zero-padded."""
    padded = torch.nn.functional.pad(packed_bytes.contiguous(), (0, -packed_bytes.shape[1] % 4))
    rows = padded.shape[0]  # little-endian words: the same bits in the same order (flattened: a view needs
    return padded.reshape(-1).view(torch.int32).reshape(rows, -1)  # strides a (1, n) tensor may not have)


def from_stream_int32(words: Tensor, n_bytes: int) -> Tensor:
    rows = words.shape[0]
    return words.contiguous().reshape(-1).view(torch.uint8).reshape(rows, -1)[:, :n_bytes].contiguous()


def layer_tensors(layer: QuantLinear, dtype: torch.dtype) -> dict[str, Tensor]:
    """One layer's compressed-tensors tensors (without the module prefix)."""
    bits = layer.spec.bits
    out = {"weight_packed": to_stream_int32(layer.qweight.cpu()),
           "weight_scale": layer.scales.to(dtype).cpu(),
           "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if not symmetric(layer):  # a symmetric grid's Z is 2^(bits-1): compressed-tensors stores none
        zeros = layer.zeros.cpu()  # (out, G): pack each column's out values
        out["weight_zero_point"] = to_stream_int32(pack(zeros.T, bits)).T.contiguous()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(dtype).cpu()
    return out


def symmetric(layer: QuantLinear) -> bool:
    return layer.spec.symmetric and bool((layer.zeros == 2 ** (layer.spec.bits - 1)).all())


def expected_shapes(layer: QuantLinear) -> dict[str, tuple]:
    """The shapes a layer's compressed-tensors tensors must have (a zero point only if asymmetric)."""
    bits, (out, groups) = layer.spec.bits, layer.scales.shape
    shapes = {"weight_packed": (out, -(-packed_width(layer.in_features, bits) // 4)), "weight_scale": (out, groups)}
    if not layer.spec.symmetric:
        shapes["weight_zero_point"] = (-(-packed_width(out, bits) // 4), groups)
    return shapes


def fill_layer(layer: QuantLinear, tensors: dict[str, Tensor]) -> None:
    """Set an empty QuantLinear's buffers from its compressed-tensors tensors."""
    bits = layer.spec.bits
    layer.qweight = from_stream_int32(tensors["weight_packed"], packed_width(layer.in_features, bits))
    layer.scales = tensors["weight_scale"].float()
    if "weight_zero_point" in tensors:
        words = tensors["weight_zero_point"].T.contiguous()  # (G, ⌈out·b/32⌉)
        layer.zeros = unpack(from_stream_int32(words, packed_width(layer.out_features, bits)), bits,
                             layer.out_features).T.contiguous()
    else:
        layer.zeros = torch.full_like(layer.scales, 2 ** (bits - 1), dtype=torch.uint8)
    if "bias" in tensors:
        layer.bias = torch.nn.Parameter(tensors["bias"].float(), requires_grad=False)


def quantization_config(modules: dict[str, QuantLinear]) -> dict:
    """config.json's `quantization_config`: one group per (bits, group size, symmetry), naming its layers."""
    groups: dict[tuple, list[str]] = {}
    for name, layer in modules.items():
        group = layer.spec.group_for(layer.in_features)
        groups.setdefault((layer.spec.bits, group, symmetric(layer)), []).append(name)
    config_groups = {}
    for i, ((bits, group, sym), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": sorted(names), "input_activations": None, "output_activations": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
                        "strategy": "group" if group > 0 else "channel", "group_size": group if group > 0 else None,
                        "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}}}
    # `dequantize`: transformers decompresses to dense weights at load. Its default path (layers kept packed)
    # sizes asymmetric zero points unpacked while compressed-tensors 0.20 packs them, and refuses the file.
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None,
            "dequantize": True}

"""Module surgery: every method that swaps, unwraps or measures layers does it with these.

Methods compose because they swap modules (an adapter wraps a linear as `base_layer`, a quantizer
replaces it by a packed layer, a pruner edits its weight), so they must agree on what a linear
layer is and where its (out, in) weight lives:
    nn.Linear          weight (out, in)
    GPT-2's Conv1D     weight (in, out): y = x W + b, the transpose of nn.Linear's layout
    a packed layer     no float weight; `dequantized_weight()` reads what it multiplies by
"""

from itertools import chain

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from llmlab.models.packed.qlinear import QuantizedLinear


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` under `root` by `module`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def innermost(module: nn.Module) -> nn.Module:
    """The layer under any wrappers that keep it as `base_layer` (adapters, LoRC)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizedLinear)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D (a linear layer with its weight stored transposed), or a packed quantized linear."""
    return isinstance(module, (nn.Linear, Conv1D)) or is_quantized(module)


def linear_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of an nn.Linear or a Conv1D; a view, so writing to it writes the layer's weight."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a Conv1D or a packed layer, under any wrappers."""
    module = innermost(module)
    if is_quantized(module):
        return module.in_features, module.out_features
    out_features, in_features = linear_weight(module).shape
    return in_features, out_features


def conv1d_as_linear(conv: Conv1D) -> nn.Linear:
    """The nn.Linear that computes what a GPT-2 Conv1D computes, so every method sees one layout."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def device_of(module: nn.Module) -> torch.device:
    """Where the (innermost) layer's tensors live; a packed layer may hold only buffers."""
    return next(chain(innermost(module).parameters(), innermost(module).buffers())).device


def count_parameters(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters of the model, a tied tensor counted once; with `nonzero`, only its nonzero entries."""
    seen, total = set(), 0
    for p in model.parameters():
        key = p.data_ptr() or id(p)  # meta and empty tensors have no storage to compare
        if key not in seen:
            seen.add(key)
            total += int((p != 0).sum()) if nonzero else p.numel()
    return total

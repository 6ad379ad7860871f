"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024).

https://arxiv.org/abs/2402.09353

DoRA splits a frozen weight W into a magnitude and a direction, and adapts the direction with LoRA:

    W' = m · (W + s·BA) / ‖W + s·BA‖_c,    m initialised to ‖W‖_c, so training starts from W

where ‖·‖_c is the L2 norm of each output row of the (out, in) weight (the paper's column norm of
its (in, out) W) and s·BA is LoRA's update. As the paper suggests (§4.3) and peft does, the norm
is a constant in backprop: gradients reach m, A and B, not through ‖W + s·BA‖_c. The layer never
forms W'; with n = ‖W + s·BA‖_c it computes

    h = W x + b + (m/n − 1) · W x + (m/n) · s·BA x  =  (m/n) ⊙ (W + s·BA) x + b

DoRA decomposes the pretrained weight itself, so it always sits right on the linear layer: added to
a layer that already carries other adapters (LoRA, IA3), it goes inside them, and they act on its
output as they did on the plain layer's.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.models.surgery import device_of, linear_shape, set_module
from llmlab.peft import lora
from llmlab.peft.base import DEFAULT, AdapterLayer, Method, mark_trainable, set_adapter
from llmlab.peft.lora import LoRA, LoraConfig, LoraLinear
from llmlab.peft.targets import default_targets, find_targets, read_weight, weight_of


@dataclass
class DoraConfig(LoraConfig):
    """DoRA takes LoRA's options (r, alpha, dropout, targets, regex, rslora); m comes on top of A and B."""


class DoRA(LoRA):
    """One adapter's A, B, dropout and magnitude m (out,) for one layer."""

    def __init__(self, layer: nn.Module, cfg: DoraConfig):
        super().__init__(*linear_shape(layer), cfg)
        weight = read_weight(layer).detach()
        self.magnitude = nn.Parameter(self.weight_norm(weight).to(self.A.weight.dtype))  # ‖W‖_c: B is zero

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·BA‖ of each output row, (out,); detached: a constant for backprop (paper §4.3)."""
        lora_weight = self.delta_weight().detach().to(weight)  # (out, in), on W's device and dtype
        return torch.linalg.norm(weight + lora_weight, dim=1).detach()

    def forward(self, x: torch.Tensor, wx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the layer's output: (m/n − 1)·W x + (m/n)·s·BA x.

        x (..., in) in the adapter's dtype; wx (..., out) the layer's output without its bias, i.e.
        W x; weight (out, in) the base weight W, in x's dtype.
        """
        scale = self.magnitude / self.weight_norm(weight)  # (out,) m/n
        if self.training and not isinstance(self.dropout, nn.Identity):
            # dropout drops the input of both terms, so W x is recomputed from the dropped input
            x = self.dropout(x)
            wx = F.linear(x, weight)
        return (scale - 1) * wx + scale * self.B(self.A(x)) * self.scaling


class DoraLinear(AdapterLayer):
    """A linear layer (nn.Linear or Conv1D, never another adapter) with DoRA adapters."""

    method = "dora"
    peft_keys = {**LoraLinear.peft_keys, "magnitude": "lora_magnitude_vector"}

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.norms: dict[str, torch.Tensor] = {}  # n of each merged adapter, from the unmerged W: to unmerge exactly

    def forward(self, x):
        out = self.base_layer(x)
        dtype, bias = out.dtype, self.base_layer.bias
        for name in self.running():
            dora = self.adapters[name]
            x = x.to(dora.A.weight.dtype)
            # like peft, a second adapter rescales the first one's output too: (out - b) is W x plus it
            wx = out if bias is None else out - bias
            out = out + dora(x, wx, self.base_weight().to(x.dtype))
        return out.to(dtype)

    def base_weight(self) -> torch.Tensor:
        """W (out, in): the layer's weight with the merged DoRA adapters taken out, as every n is taken of it."""
        weight = read_weight(self.base_layer)
        if self.merged:
            with torch.no_grad():
                for name in reversed(self.merged):
                    weight = weight / self._factor(name) - self.adapters[name].delta_weight()
        return weight

    def _factor(self, name: str) -> torch.Tensor:
        m = self.adapters[name].magnitude
        return (m / self.norms[name].to(m.device)).view(-1, 1)  # (out, 1): m/n of a merged adapter

    def merge(self, name: str):
        # W ← (m/n) · (W + s·BA), with n from the unmerged W, as forward computes it
        dora = self.adapters[name]
        with torch.no_grad():
            delta = dora.delta_weight()  # (out, in)
            self.norms[name] = torch.linalg.norm(self.base_weight() + delta, dim=1)
            weight = weight_of(self.base_layer)
            weight.copy_(self._factor(name) * (weight + delta))

    def unmerge(self, name: str):
        with torch.no_grad():
            weight = weight_of(self.base_layer)
            weight.copy_(weight / self._factor(name) - self.adapters[name].delta_weight())
        del self.norms[name]


def dora_layer(model: nn.Module, path: str) -> DoraLinear:
    """The DoraLinear for the layer at `path`: right on the linear layer, inside any other adapter layers there."""
    module = model.get_submodule(path)
    while isinstance(module, AdapterLayer) and not isinstance(module, DoraLinear):
        path, module = f"{path}.base_layer", module.base_layer
    if not isinstance(module, DoraLinear):
        module = DoraLinear(module)
        set_module(model, path, module)
    return module


def apply_dora(model: nn.Module, cfg: DoraConfig | None = None, name: str = DEFAULT) -> nn.Module:
    """Add DoRA adapter `name` to the targeted layers, make it active and the only trainable part."""
    cfg = cfg or DoraConfig()
    targets = cfg.targets or ([] if cfg.regex else default_targets(model))
    for path in find_targets(model, targets, cfg.regex):
        layer = dora_layer(model, path)
        layer.add(name, DoRA(layer.base_layer, cfg).to(device_of(layer.base_layer)))
    set_adapter(model, name)
    mark_trainable(model, name)
    return model


def to_peft(cfg: DoraConfig, model: nn.Module) -> dict:
    return {**lora.to_peft(cfg, model), "use_dora": True}


def from_peft(fields: dict) -> DoraConfig | None:
    if not fields.get("use_dora"):
        return None
    return DoraConfig(**lora.lora_fields(fields))


METHOD = Method(DoraConfig, apply_dora, "LORA", to_peft, from_peft)

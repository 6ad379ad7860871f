"""(IA)³: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning
(Liu et al., 2022).

https://arxiv.org/abs/2205.05638

(IA)³, "Infused Adapter by Inhibiting and Amplifying Inner Activations", learns one vector per
adapted layer that rescales activations element-wise: the keys and values of attention and the
hidden activations of the feed-forward block,

    k = l_k ⊙ (W_k x),    v = l_v ⊙ (W_v x),    h = W_down (l_ff ⊙ γ(W_up x))

so it scales the *output* of the key and value projections and the *input* of the feed-forward
down projection. The vectors start at ones (the base model exactly) and are the only trainable
parameters: a few thousand per layer. Since l ⊙ (W x + b) = (diag(l) W) x + l ⊙ b and
W (l ⊙ x) = (W diag(l)) x, they fold into W's rows (and bias) or columns: no extra latency.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.surgery import device_of, linear_shape, set_module
from llmlab.peft.base import DEFAULT, AdapterLayer, Method, mark_trainable, set_adapter
from llmlab.peft.targets import ALL_LINEAR, default_targets, find_targets, peft_targets, read_targets, weight_of


@dataclass
class IA3Config:
    targets: list[str] = field([], help="module names to adapt (default: peft's choice for the architecture, "
                                        "e.g. k_proj,v_proj,down_proj); all-linear for every linear layer")
    regex: str | None = field(None, help="adapt the modules whose full name matches this regex instead")
    feedforward: list[str] | None = field(None, help="the targets that are feed-forward layers, whose input is "
                                                     "rescaled instead of their output (default: peft's choice, "
                                                     "e.g. down_proj)")

    def __post_init__(self):
        # peft's rule: a module named as feed-forward must be one of the targets
        if self.feedforward and self.targets and self.targets != [ALL_LINEAR] and self.regex is None:
            extra = [f for f in self.feedforward if f not in self.targets]
            if extra:
                raise LlmlabError(f"ia3 feedforward module '{extra[0]}' is not in targets "
                                  f"({', '.join(self.targets)}); add it to targets or remove it from feedforward")


def feedforward_names(cfg: IA3Config, model: nn.Module) -> list[str]:
    return cfg.feedforward if cfg.feedforward is not None else default_targets(model, "ia3_feedforward")


def is_feedforward(path: str, feedforward: list[str]) -> bool:
    # peft matches feed-forward names by plain suffix (no "." boundary), unlike target names
    return any(path.endswith(f) for f in feedforward)


class IA3(nn.Module):
    """One adapter's learned vector l for one layer: (out, 1) scales its output, (1, in) its input."""

    def __init__(self, in_features: int, out_features: int, feedforward: bool, cfg: IA3Config):
        super().__init__()
        self.cfg = cfg
        self.feedforward = feedforward
        self.scale = nn.Parameter(torch.ones((1, in_features) if feedforward else (out_features, 1)))


class IA3Linear(AdapterLayer):
    method = "ia3"
    peft_keys = {"scale": "ia3_l"}

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        # the weight and bias before merging an adapter whose l has zeros: dividing by l cannot restore them
        self.erased: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def forward(self, x):
        # several active adapters multiply, as in peft; x: (..., in), l_in (in,), l_out (out,)
        l_in = _product([a.scale for a in self._running_adapters() if a.feedforward])
        l_out = _product([a.scale for a in self._running_adapters() if not a.feedforward])
        if l_in is not None:
            x = (x.to(l_in.dtype) * l_in).to(x.dtype)
        out = self.base_layer(x)
        return out if l_out is None else (out * l_out).to(out.dtype)

    def _running_adapters(self) -> list[IA3]:
        return [self.adapters[name] for name in self.running()]

    def merge(self, name: str):
        ia3 = self.adapters[name]
        weight, bias = weight_of(self.base_layer), self.base_layer.bias  # (out, in), (out,)
        with torch.no_grad():
            if (ia3.scale == 0).any():
                self.erased[name] = (weight.clone(), None if bias is None else bias.clone())
            weight.copy_(weight * ia3.scale)  # (out, 1) scales rows, (1, in) columns
            if bias is not None and not ia3.feedforward:
                bias.copy_(bias * ia3.scale.flatten())

    def unmerge(self, name: str):
        ia3 = self.adapters[name]
        weight, bias = weight_of(self.base_layer), self.base_layer.bias
        with torch.no_grad():
            if name in self.erased:
                kept_weight, kept_bias = self.erased.pop(name)
                weight.copy_(kept_weight)
                if kept_bias is not None:
                    bias.copy_(kept_bias)
                return
            weight.copy_(weight / ia3.scale)
            if bias is not None and not ia3.feedforward:
                bias.copy_(bias / ia3.scale.flatten())


def _product(scales: list[torch.Tensor]) -> torch.Tensor | None:
    out = None
    for scale in scales:
        out = scale.flatten() if out is None else out * scale.flatten()
    return out


def apply_ia3(model: nn.Module, cfg: IA3Config | None = None, name: str = DEFAULT) -> nn.Module:
    """Add (IA)³ adapter `name` to the targeted layers, make it active and the only trainable part."""
    cfg = cfg or IA3Config()
    feedforward = feedforward_names(cfg, model)
    targets = cfg.targets or ([] if cfg.regex else default_targets(model, "ia3"))
    for path in find_targets(model, targets, cfg.regex):
        layer = model.get_submodule(path)
        if not isinstance(layer, IA3Linear):
            layer = IA3Linear(layer)
            set_module(model, path, layer)
        adapter = IA3(*linear_shape(layer.base_layer), is_feedforward(path, feedforward), cfg)
        layer.add(name, adapter.to(device_of(layer.base_layer)))
    set_adapter(model, name)
    mark_trainable(model, name)
    return model


def to_peft(cfg: IA3Config, model: nn.Module) -> dict:
    targets = peft_targets(cfg, model, "ia3")
    feedforward = feedforward_names(cfg, model)
    if isinstance(targets, list):
        # peft wants feedforward_modules ⊆ target_modules: name the feed-forward targets themselves
        feedforward = [t for t in targets if is_feedforward(t, feedforward)]
    return {"target_modules": targets, "feedforward_modules": feedforward,
            "fan_in_fan_out": any(isinstance(m, Conv1D) for m in model.modules()),
            "init_ia3_weights": True, "modules_to_save": None}


def from_peft(fields: dict) -> IA3Config:
    if fields.get("modules_to_save") not in (None, []):
        raise LlmlabError(f"peft adapters with modules_to_save={fields['modules_to_save']!r} are not supported")
    feedforward = fields.get("feedforward_modules")
    if isinstance(feedforward, str):
        raise LlmlabError(f"peft IA3 adapters with a regex feedforward_modules ('{feedforward}') are not "
                          f"supported; list the feed-forward modules by name")
    targets, regex = read_targets(fields)
    return IA3Config(targets=targets, regex=regex, feedforward=None if feedforward is None else sorted(feedforward))


METHOD = Method(IA3Config, apply_ia3, "IA3", to_peft, from_peft)

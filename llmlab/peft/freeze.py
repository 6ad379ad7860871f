"""Freeze tuning and full fine-tuning: the baselines the adapter methods are measured against.

Freeze tuning trains a few whole decoder layers — by default the last two, as LLaMA-Factory's
`freeze_trainable_layers: 2` — and keeps the rest of the model fixed; full fine-tuning trains
every weight. Neither adds modules: they only set `requires_grad`, so the result is a plain
model, saved whole with `llmlab.models.save_model` (there is no adapter to save).

With tied input and output embeddings, naming `lm_head` (or `embed_tokens`) in `modules` trains
the one shared matrix, which changes both.
"""

from dataclasses import dataclass

from torch import nn

from llmlab.config import field
from llmlab.errors import LlmlabError, closest
from llmlab.models.layers import decoder_layers
from llmlab.peft.base import DEFAULT, Method
from llmlab.peft.targets import matches


@dataclass
class FreezeConfig:
    layers: list[int] = field([-2, -1], help="decoder layers to train, by index; negative counts from the "
                                             "last (-1 is the last layer)")
    modules: list[str] = field([], help="more modules to train, by name as for adapter targets: embed_tokens, "
                                        "lm_head, mlp (every layer's MLP), layers.3.self_attn, …")

    def __post_init__(self):
        if not self.layers and not self.modules:
            raise LlmlabError("freeze would train nothing: give layers (e.g. --adapter.layers -2,-1) or modules")


@dataclass
class FullConfig:
    """Full fine-tuning has no options: every parameter trains."""


def apply_freeze(model: nn.Module, cfg: FreezeConfig | None = None, name: str = DEFAULT) -> nn.Module:
    """Train only the chosen decoder layers and modules; `name` is unused (there is no adapter to name)."""
    cfg = cfg or FreezeConfig()
    stack = decoder_layers(model)
    n = len(stack)
    model.requires_grad_(False)
    for index in cfg.layers:
        if not -n <= index < n:
            raise LlmlabError(f"freeze layer index {index} is out of range: {type(model).__name__} has {n} "
                              f"decoder layers, so use {-n}..{n - 1}")
        stack[index].requires_grad_(True)
    for pattern in cfg.modules:
        found = [m for path, m in model.named_modules() if path and matches(path, [pattern])]
        if not found:
            raise LlmlabError(f"freeze module '{pattern}' matches no module of {type(model).__name__}"
                              f"{closest(pattern, _short_names(model))}; e.g. {', '.join(_short_names(model)[:12])}")
        for module in found:
            module.requires_grad_(True)
    return model


def apply_full(model: nn.Module, cfg: FullConfig | None = None, name: str = DEFAULT) -> nn.Module:
    """Make every parameter trainable; `name` is unused (there is no adapter to name)."""
    model.requires_grad_(True)
    return model


def _short_names(model: nn.Module) -> list[str]:
    """The distinct last parts of module names that are not layer indices: embed_tokens, self_attn, …"""
    names = dict.fromkeys(path.rsplit(".", 1)[-1] for path, _ in model.named_modules() if path)
    return [n for n in names if not n.isdigit()]


FREEZE = Method(FreezeConfig, apply_freeze)
FULL = Method(FullConfig, apply_full)

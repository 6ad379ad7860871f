"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021).

https://arxiv.org/abs/2106.09685

A frozen weight W gets a trainable low-rank update:

    h = W x + (α / r) · B A x,    A ∈ R^{r×k} (Kaiming-uniform), B ∈ R^{d×r} (zeros)

so training starts from the base model exactly. rsLoRA (Kalajdzievski, 2023,
https://arxiv.org/abs/2312.03732) scales by α / √r instead, which keeps the update's size
stable as r grows. After training, B A folds into W: no extra latency at inference.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.surgery import linear_shape
from llmlab.peft.base import DEFAULT, AdapterLayer, Method, mark_trainable, set_adapter
from llmlab.peft.targets import peft_targets, read_targets, weight_of, wrap_targets


@dataclass
class LoraConfig:
    r: int = field(8, help="rank of the update B·A")
    alpha: float = field(16.0, help="scaling numerator: the update is multiplied by alpha / r")
    dropout: float = field(0.0, help="dropout on the adapter's input")
    targets: list[str] = field([], help="module names to adapt (default: peft's choice for the "
                                        "architecture, e.g. q_proj,v_proj); all-linear for every linear layer")
    regex: str | None = field(None, help="adapt the modules whose full name matches this regex instead")
    rslora: bool = field(False, help="scale by alpha / sqrt(r) (rank-stabilised LoRA)")

    def __post_init__(self):
        if self.r <= 0:
            raise LlmlabError(f"lora r must be a positive integer, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise LlmlabError(f"lora dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRA(nn.Module):
    """One adapter's A, B and dropout for one layer."""

    def __init__(self, in_features: int, out_features: int, cfg: LoraConfig):
        super().__init__()
        self.cfg = cfg
        self.A = nn.Linear(in_features, cfg.r, bias=False)
        self.B = nn.Linear(cfg.r, out_features, bias=False)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.scaling = cfg.scaling
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def forward(self, x):
        return self.B(self.A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.B.weight @ self.A.weight) * self.scaling  # (out, in)


class LoraLinear(AdapterLayer):
    method = "lora"
    peft_keys = {"A.weight": "lora_A.weight", "B.weight": "lora_B.weight"}

    def forward(self, x):
        out = self.base_layer(x)
        for name in self.running():
            lora = self.adapters[name]
            out = out + lora(x.to(lora.A.weight.dtype)).to(out.dtype)
        return out

    def merge(self, name: str):
        _add_to_weight(self.base_layer, self.adapters[name].delta_weight())

    def unmerge(self, name: str):
        _add_to_weight(self.base_layer, -self.adapters[name].delta_weight())


def _add_to_weight(layer: nn.Module, delta: torch.Tensor):
    with torch.no_grad():
        weight = weight_of(layer)  # (out, in) view of the innermost layer's weight, for any storage order
        weight += delta.to(weight.dtype)


def apply_lora(model: nn.Module, cfg: LoraConfig | None = None, name: str = DEFAULT) -> nn.Module:
    """Add LoRA adapter `name` to the targeted layers, make it active and the only trainable part."""
    cfg = cfg or LoraConfig()
    wrap_targets(model, cfg, name, LoraLinear, lambda layer: LoRA(*linear_shape(layer), cfg))
    set_adapter(model, name)
    mark_trainable(model, name)
    return model


def to_peft(cfg: LoraConfig, model: nn.Module) -> dict:
    return {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "target_modules": peft_targets(cfg, model),
            "use_rslora": cfg.rslora, "use_dora": False, "bias": "none",
            "fan_in_fan_out": any(isinstance(m, Conv1D) for m in model.modules()),
            "init_lora_weights": True, "modules_to_save": None}


def lora_fields(fields: dict) -> dict:
    """The LoRA options of a peft LoraConfig dict; refuses the variants llmlab does not run."""
    for key, plain in (("rank_pattern", {}), ("alpha_pattern", {}), ("bias", "none"),
                       ("modules_to_save", None), ("layers_to_transform", None)):
        if fields.get(key, plain) not in (plain, None, {}, []):
            raise LlmlabError(f"peft adapters with {key}={fields[key]!r} are not supported")
    targets, regex = read_targets(fields)
    return {"r": fields.get("r", 8), "alpha": float(fields.get("lora_alpha", 8)),
            "dropout": float(fields.get("lora_dropout", 0.0)),
            "targets": targets, "regex": regex,
            "rslora": bool(fields.get("use_rslora", False))}


def from_peft(fields: dict) -> LoraConfig | None:
    if fields.get("use_dora"):
        return None
    return LoraConfig(**lora_fields(fields))


METHOD = Method(LoraConfig, apply_lora, "LORA", to_peft, from_peft)

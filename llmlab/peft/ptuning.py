"""P-tuning: GPT Understands, Too (Liu et al., 2021).

https://arxiv.org/abs/2103.10385

Like prompt tuning, n virtual tokens are fed before the input, but their embeddings come out of a
small prompt encoder rather than being free parameters, which makes them depend on each other
and trains more stably:

    h_i = MLP([→LSTM(e_{0:i}); ←LSTM(e_{i:n})])     (encoder = lstm, the paper's)
    h_i = MLP(e_i)                                   (encoder = mlp, peft's recommended default)

The paper places the virtual tokens around the input by a template; as in peft they all come
first here. After training only h (n × hidden) is kept: the encoder is a training device.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.peft.base import DEFAULT, Method
from llmlab.peft.inputs import add_input_adapter, peft_fields, virtual_tokens
from llmlab.peft.prompt import PromptAdapters


@dataclass
class PTuningConfig:
    virtual_tokens: int = field(20, help="number n of virtual tokens")
    encoder: Literal["mlp", "lstm"] = field("mlp", help="prompt encoder: a 3-layer MLP, or a bidirectional "
                                                        "LSTM followed by a 2-layer MLP (the paper's)")
    encoder_hidden: int | None = field(None, help="the encoder's hidden width (default: the model's hidden size)")
    encoder_layers: int = field(2, help="LSTM layers (the MLP encoder has a fixed shape)")
    encoder_dropout: float = field(0.0, help="dropout between LSTM layers")

    def __post_init__(self):
        if self.encoder not in ("mlp", "lstm"):
            raise LlmlabError(f"ptuning encoder must be mlp or lstm, got '{self.encoder}'")
        if self.virtual_tokens < 1:
            raise LlmlabError(f"ptuning virtual_tokens must be at least 1, got {self.virtual_tokens}")
        if self.encoder_hidden is not None and self.encoder_hidden < 1:
            raise LlmlabError(f"ptuning encoder_hidden must be positive, got {self.encoder_hidden}")
        if self.encoder_layers < 1:
            raise LlmlabError(f"ptuning encoder_layers must be at least 1, got {self.encoder_layers}")
        if self.encoder == "mlp" and self.encoder_layers != 2:
            raise LlmlabError("ptuning encoder_layers applies to encoder=lstm only; the MLP encoder "
                              "always has 2 hidden layers")
        if not 0 <= self.encoder_dropout < 1:
            raise LlmlabError(f"ptuning encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


class PromptEncoder(nn.Module):
    """e (n, H) → h (n, H) through an MLP, or an LSTM and an MLP; peft's PromptEncoder."""

    def __init__(self, cfg: PTuningConfig, width: int):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.encoder_hidden or width
        self.embedding = nn.Parameter(torch.randn(cfg.virtual_tokens, width))  # N(0, 1), as nn.Embedding
        if cfg.encoder == "lstm":
            self.lstm = nn.LSTM(width, hidden, num_layers=cfg.encoder_layers, dropout=cfg.encoder_dropout,
                                bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))
        else:
            self.lstm = None
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, width))

    def forward(self) -> torch.Tensor:
        e = self.embedding[None]  # (1, n, H)
        if self.lstm is not None:
            e = self.lstm(e)[0]  # (1, n, 2·hidden): both directions
        return self.mlp(e)[0]  # (n, H)


class PTuningAdapters(PromptAdapters):
    method = "ptuning"
    attr = "ptuning_adapters"


def apply_ptuning(model: nn.Module, cfg: PTuningConfig | None = None, name: str = DEFAULT) -> nn.Module:
    """Add P-tuning adapter `name`, make it active and the only trainable part."""
    cfg = cfg or PTuningConfig()
    width = model.get_input_embeddings().weight.shape[1]
    return add_input_adapter(model, PTuningAdapters, name, PromptEncoder(cfg, width))


def to_peft(cfg: PTuningConfig, model: nn.Module) -> dict:
    return {**peft_fields(model, cfg), "encoder_reparameterization_type": cfg.encoder.upper(),
            "encoder_hidden_size": cfg.encoder_hidden or model.get_input_embeddings().weight.shape[1],
            "encoder_num_layers": cfg.encoder_layers, "encoder_dropout": cfg.encoder_dropout}


def from_peft(fields: dict) -> PTuningConfig:
    # the file holds the derived prompt only, so the encoder's shape does not matter when loading
    encoder = str(fields.get("encoder_reparameterization_type", "MLP")).lower()
    return PTuningConfig(virtual_tokens=virtual_tokens(fields), encoder=encoder,
                         encoder_layers=int(fields.get("encoder_num_layers", 2)) if encoder == "lstm" else 2)


METHOD = Method(PTuningConfig, apply_ptuning, "P_TUNING", to_peft, from_peft)

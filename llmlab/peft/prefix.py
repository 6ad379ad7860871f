"""Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, 2021), and P-tuning v2.

https://arxiv.org/abs/2101.00190, https://arxiv.org/abs/2110.07602

Every attention layer l attends to n learned key/value pairs before the sequence's own:

    K_l = [P_l^K; K_l(x)],  V_l = [P_l^V; V_l(x)],    P = [P_1^K P_1^V … P_L^K P_L^V] ∈ R^{n × L·2·d_kv}

Training P directly is unstable, so Li & Liang re-parameterise it during training by an MLP over
a smaller matrix (§4.3),  P = MLP_θ(P'),  P' ∈ R^{n × d_kv};  afterwards only P is kept.
P-tuning v2 (Liu et al., 2021) trains the same deep prompt directly, without the MLP: the
"ptuning2" method. Both are peft's PREFIX_TUNING, with prefix_projection true or false.

The prefix reaches the model as a pre-filled KV cache, so real tokens take positions n, n+1, …
exactly as in peft (which adds n to given position ids, as the hooks here do).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.peft.base import DEFAULT, Method
from llmlab.peft.inputs import InputAdapters, SoftPrompt, add_input_adapter, cache_key, peft_fields, virtual_tokens


@dataclass
class PrefixConfig:
    virtual_tokens: int = field(20, help="prefix length n")
    projection: bool = field(True, help="re-parameterise the prefix by an MLP while training (Li & Liang); "
                                        "false: train it directly, as ptuning2")
    encoder_hidden: int | None = field(None, help="the MLP's hidden width (default: the model's key/value width)")

    def __post_init__(self):
        if self.virtual_tokens < 1:
            raise LlmlabError(f"prefix virtual_tokens must be at least 1, got {self.virtual_tokens}")
        if self.encoder_hidden is not None and self.encoder_hidden < 1:
            raise LlmlabError(f"prefix encoder_hidden must be positive, got {self.encoder_hidden}")


@dataclass
class PTuningV2Config:
    virtual_tokens: int = field(20, help="deep prompt length n at every layer")

    projection = False  # not options: P-tuning v2 trains the deep prompt itself
    encoder_hidden = None

    def __post_init__(self):
        if self.virtual_tokens < 1:
            raise LlmlabError(f"ptuning2 virtual_tokens must be at least 1, got {self.virtual_tokens}")


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's attention, as peft reads them."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class PrefixEncoder(nn.Module):
    """P = MLP(P'): the prefix while training, re-parameterised."""

    def __init__(self, cfg: PrefixConfig, kv_width: int, layers: int):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.encoder_hidden or kv_width
        self.embedding = nn.Parameter(torch.randn(cfg.virtual_tokens, kv_width))  # P', N(0, 1) as nn.Embedding
        self.mlp = nn.Sequential(nn.Linear(kv_width, hidden), nn.Tanh(), nn.Linear(hidden, layers * 2 * kv_width))

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding)  # (n, L·2·d_kv)


class PrefixAdapters(InputAdapters):
    """Feeds the prefix as a KV cache holding n positions in every layer."""

    method = "prefix"
    attr = "prefix_adapters"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.layers, self.heads, self.head_dim = kv_shape(model)

    def feed(self, model, kwargs, prompts):
        if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            # checkpointed layers are called without the cache, so the prefix would silently vanish
            raise LlmlabError(f"{self.method} adapters do not work with gradient checkpointing; turn it off")
        B, n, _ = prompts.shape
        dtype = model.get_input_embeddings().weight.dtype
        kv = prompts.to(dtype).view(B, n, 2 * self.layers, self.heads, self.head_dim)
        kv = kv.permute(2, 0, 3, 1, 4)  # (2L, B, heads, n, head_dim): layer l's keys at 2l, values at 2l+1
        key = cache_key(model, kwargs)
        cache = kwargs.get(key)
        if cache is None:
            kwargs[key] = DynamicCache(list(zip(kv[0::2], kv[1::2])))
        else:  # an empty cache the caller holds on to (transformers' generate): fill it in place
            for layer in range(self.layers):
                cache.update(kv[2 * layer], kv[2 * layer + 1], layer)


class PTuningV2Adapters(PrefixAdapters):
    method = "ptuning2"
    attr = "ptuning2_adapters"


def _add(model: nn.Module, kind: type, cfg, name: str) -> nn.Module:
    layers, heads, head_dim = kv_shape(model)
    kv_width = heads * head_dim
    if cfg.projection:
        adapter = PrefixEncoder(cfg, kv_width, layers)
    else:
        adapter = SoftPrompt(cfg, torch.randn(cfg.virtual_tokens, layers * 2 * kv_width))
    return add_input_adapter(model, kind, name, adapter)


def apply_prefix(model: nn.Module, cfg: PrefixConfig | None = None, name: str = DEFAULT) -> nn.Module:
    """Add prefix `name` to every layer, make it active and the only trainable part."""
    return _add(model, PrefixAdapters, cfg or PrefixConfig(), name)


def apply_ptuning2(model: nn.Module, cfg: PTuningV2Config | None = None, name: str = DEFAULT) -> nn.Module:
    """Add deep prompt `name` (P-tuning v2: a prefix trained directly), active and the only trainable part."""
    return _add(model, PTuningV2Adapters, cfg or PTuningV2Config(), name)


def to_peft(cfg, model: nn.Module) -> dict:
    _, heads, head_dim = kv_shape(model)
    # peft stores the key/value width as token_dim (and the kv heads as num_attention_heads) for prefixes
    return {**peft_fields(model, cfg), "token_dim": heads * head_dim, "num_attention_heads": heads,
            "prefix_projection": cfg.projection, "encoder_hidden_size": cfg.encoder_hidden or heads * head_dim,
            "init_weights": None}


def from_peft(fields: dict) -> PrefixConfig | None:
    if not fields.get("prefix_projection"):
        return None
    return PrefixConfig(virtual_tokens=virtual_tokens(fields), projection=True,
                        encoder_hidden=fields.get("encoder_hidden_size"))


def from_peft_v2(fields: dict) -> PTuningV2Config | None:
    return None if fields.get("prefix_projection") else PTuningV2Config(virtual_tokens=virtual_tokens(fields))


METHOD = Method(PrefixConfig, apply_prefix, "PREFIX_TUNING", to_peft, from_peft)
METHOD_V2 = Method(PTuningV2Config, apply_ptuning2, "PREFIX_TUNING", to_peft, from_peft_v2)

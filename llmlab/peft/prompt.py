"""Prompt tuning: The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al., 2021).

https://arxiv.org/abs/2104.08691

A frozen model reads n learned embeddings P_e ∈ R^{n×e} before the embedded input X_e:

    max_{P_e}  log p_θ(Y | [P_e; X_e]),    [P_e; X_e] ∈ R^{(n+T)×e}

Nothing inside the model changes, so one frozen model serves many tasks, each a few thousand
numbers. P_e starts from random values, from the embeddings of random vocabulary tokens, or from
a text's embeddings (the paper's class-label / vocabulary init helps small models most).

Prompt ensembling (§7): K prompts trained for one task on the same frozen model make an
ensemble for the price of one batch of K·B rows; `ensemble` averages their predictions.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.peft.base import DEFAULT, Method, adapter_modules
from llmlab.peft.inputs import InputAdapters, SoftPrompt, add_input_adapter, peft_fields, virtual_tokens


@dataclass
class PromptConfig:
    virtual_tokens: int = field(20, help="length n of the soft prompt")
    init: Literal["random", "vocab", "text"] = field(
        "random", help="start from uniform [-0.5, 0.5] values, the embeddings of random vocabulary "
                       "tokens, or the embeddings of init_text")
    init_text: str | None = field(None, help="text whose tokens (repeated or cut to virtual_tokens) start the prompt")
    tokenizer: str | None = field(None, help="model whose tokenizer encodes init_text (default: the model's own)")

    def __post_init__(self):
        if self.virtual_tokens < 1:
            raise LlmlabError(f"prompt virtual_tokens must be at least 1, got {self.virtual_tokens}")
        if (self.init == "text") != (self.init_text is not None):
            raise LlmlabError("prompt init=text and init_text go together: set both, or neither")
        if self.init_text == "":
            raise LlmlabError("prompt init_text is empty; give some text or use init=random")


class PromptAdapters(InputAdapters):
    """Feeds [P; E(x)] as inputs_embeds on the first call of a sequence."""

    method = "prompt"
    attr = "prompt_adapters"

    def feed(self, model, kwargs, prompts):
        n = prompts.shape[1]
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])  # (B, T, H)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)  # (B, n + T, H)
        positions = kwargs.get("position_ids")
        if positions is not None:  # already shifted by n: the virtual tokens take 0…n-1
            virtual = torch.arange(n, device=positions.device).expand(positions.shape[0], n)
            kwargs["position_ids"] = torch.cat([virtual, positions], dim=1)
        labels = kwargs.get("labels")
        if labels is not None:
            # as peft: the last virtual position is trained to predict the first real token
            kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
        self.real = embeds.shape[1]


def initial_prompt(model: nn.Module, cfg: PromptConfig, tokenizer=None) -> torch.Tensor:
    """(n, H) starting values, fp32, as cfg.init says."""
    embedding = model.get_input_embeddings()
    n, width = cfg.virtual_tokens, embedding.weight.shape[1]
    if cfg.init == "random":
        return torch.empty(n, width).uniform_(-0.5, 0.5)
    if cfg.init == "vocab":  # uniform over the vocabulary, as peft (the paper samples the 5,000 most common)
        ids = torch.randint(0, embedding.weight.shape[0], (n,))
    else:
        tokenizer = tokenizer or _tokenizer(model, cfg)
        ids = tokenizer(cfg.init_text).input_ids
        ids = torch.tensor((ids * math.ceil(n / len(ids)))[:n])  # repeated, then cut to n
    with torch.no_grad():
        return embedding(ids.to(embedding.weight.device)).float().cpu()


def _tokenizer(model: nn.Module, cfg: PromptConfig):
    from llmlab.models.tiny import byte_tokenizer, tiny_configs

    name = cfg.tokenizer or getattr(model, "name_or_path", "")
    if name in tiny_configs():
        return byte_tokenizer()
    if not name:
        raise LlmlabError("prompt init=text needs a tokenizer: set tokenizer (a model name or folder), "
                          "or pass tokenizer= to apply_prompt")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def apply_prompt(model: nn.Module, cfg: PromptConfig | None = None, name: str = DEFAULT,
                 tokenizer=None) -> nn.Module:
    """Add soft prompt `name`, make it active and the only trainable part."""
    cfg = cfg or PromptConfig()
    return add_input_adapter(model, PromptAdapters, name, SoftPrompt(cfg, initial_prompt(model, cfg, tokenizer)))


@torch.no_grad()
def ensemble(model: nn.Module, names: list[str], input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x_t | x_<t) under the ensemble of prompts `names`, (B, T, V).

    All K prompts run in one forward pass over K·B rows, row block k carrying prompt k. The
    ensemble's distribution is the mean of the K distributions, log(1/K Σ_k p_k): a mixture, so
    a prompt that is confidently wrong about a token only dilutes the others' probability, where
    averaging log-probabilities (a normalised geometric mean) would let it veto the token. The
    result is a proper distribution, fit for scoring, perplexity and argmax alike.
    """
    holders = [m for _, m in adapter_modules(model) if isinstance(m, InputAdapters) and set(names) <= set(m.adapters)]
    if not names or not holders:
        raise LlmlabError(f"ensemble needs prompt adapters of one method on this model; got {names}")
    K, B = len(names), input_ids.shape[0]
    mask = None if attention_mask is None else attention_mask.repeat(K, 1)
    with holders[0].per_row([n for n in names for _ in range(B)]):
        logits = model(input_ids=input_ids.repeat(K, 1), attention_mask=mask, use_cache=False).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1).view(K, B, *logits.shape[1:])  # (K, B, T, V)
    return torch.logsumexp(log_probs, dim=0) - math.log(K)


_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def to_peft(cfg: PromptConfig, model: nn.Module) -> dict:
    tokenizer = cfg.tokenizer or getattr(model, "name_or_path", "") or None
    # peft refuses TEXT without a tokenizer name; the init only matters before training anyway
    init = "RANDOM" if cfg.init == "text" and tokenizer is None else _PEFT_INIT[cfg.init]
    return {**peft_fields(model, cfg), "prompt_tuning_init": init,
            "prompt_tuning_init_text": cfg.init_text if init == "TEXT" else None,
            "tokenizer_name_or_path": tokenizer if init == "TEXT" else None, "tokenizer_kwargs": None}


def from_peft(fields: dict) -> PromptConfig:
    # the saved prompt replaces any initialisation, so loading never needs the tokenizer
    return PromptConfig(virtual_tokens=virtual_tokens(fields))


METHOD = Method(PromptConfig, apply_prompt, "PROMPT_TUNING", to_peft, from_peft)

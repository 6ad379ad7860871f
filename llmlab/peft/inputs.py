"""The input side: adapters that feed a frozen model learned vectors instead of changing its layers.

Prompt tuning, P-tuning (prompt.py, ptuning.py) and prefix tuning, P-tuning v2 (prefix.py) each
learn a prompt P ∈ R^{n×w} of n virtual tokens and hand it to the model on every call:

    input side    [P; E(x)]                     w = hidden size: n extra input embeddings
    every layer   K_l = [P_l^K; K_l(x)], V_l = [P_l^V; V_l(x)]    w = layers · 2 · kv width

One `InputAdapters` module per method hangs off the model (`model.prompt_adapters`, …), so
`named_modules()` finds it and set_adapter / disabled / delete_adapter work as for LoRA. It
registers two hooks on the model's forward, which do nothing unless one of its adapters is active:

    before  extend the attention mask by n ones; shift given position ids by n (the virtual
            tokens sit at positions 0…n-1); on the first call of a sequence (no or an empty KV
            cache) feed the prompt (`feed`, per method). Later decoding steps find it in the cache.
    after   drop the logits of the virtual positions, so callers see the length they passed in.

What is saved is the derived prompt P (peft's `prompt_embeddings`), whatever network made it
during training; `bake` swaps that network for P itself, which is how a loaded adapter lives.
"""

import inspect
from contextlib import contextmanager

import torch
from torch import nn

from llmlab.errors import LlmlabError
from llmlab.generation.forward import cache_argument
from llmlab.peft.base import Adapters, adapter_names, mark_trainable, set_adapter


class SoftPrompt(nn.Module):
    """A prompt stored as used, (virtual_tokens, width): prompt tuning's parameter, any baked encoder."""

    def __init__(self, cfg, weight: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(weight)

    def forward(self) -> torch.Tensor:
        return self.weight


class InputAdapters(Adapters):
    """The named adapters of one input-side method, and the hooks through which they feed `model`."""

    attr = ""  # the model attribute holding this module, e.g. "prompt_adapters"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.params = list(inspect.signature(model.forward).parameters)  # to name positional arguments
        self.rows: list[str] | None = None  # per-row adapters, set by `per_row`
        self.real: int | None = None  # the caller's sequence length, while the prompt is in the logits

    @classmethod
    def on(cls, model: nn.Module) -> "InputAdapters":
        """The model's module of this kind, attached with its hooks on first use."""
        module = getattr(model, cls.attr, None)
        if module is None:
            module = cls(model)
            setattr(model, cls.attr, module)  # a submodule: .to(), parameters() and named_modules() see it
            model.register_forward_pre_hook(module.before, with_kwargs=True)
            model.register_forward_hook(module.after, with_kwargs=True)
        return module

    def detach(self, model: nn.Module):
        """Remove the hooks and this module: the model is its plain self again."""
        # By identity rather than by stored handles: a deep-copied model's hooks are bound to its copy.
        for hooks, flags in ((model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs),
                             (model._forward_hooks, model._forward_hooks_with_kwargs)):
            for key, hook in list(hooks.items()):
                if getattr(hook, "__self__", None) is self:
                    del hooks[key]
                    flags.pop(key, None)
        delattr(model, self.attr)

    # ---- what each method defines ----

    def feed(self, model: nn.Module, kwargs: dict, prompts: torch.Tensor):
        """Put prompts (B, n, w) into the forward's kwargs for the first call of a sequence."""
        raise NotImplementedError

    # ---- the hooks ----

    def before(self, model, args, kwargs):
        self.real = None
        kwargs = {**dict(zip(self.params, args)), **kwargs}
        batch = _batch_size(kwargs)
        names = self.feeding(model, batch)
        if names is None:
            return None
        n = self.adapters[names[0]].cfg.virtual_tokens
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise LlmlabError(f"{self.method} adapters need a 2-D attention mask (batch, length), "
                                  f"got shape {tuple(mask.shape)}")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)  # (B, n + past + T)
        positions = kwargs.get("position_ids")
        if positions is not None:
            if bool((positions.diff(dim=-1) < 0).any()):
                raise LlmlabError(f"{self.method} adapters cannot run packed rows (the position ids restart "
                                  f"inside a row): turn packing off")
            # Real tokens sit after the n virtual ones. peft shifts given ids like this for prefixes, but
            # drops them for prompt tuning, which positions a left-padded row as if its pads were tokens;
            # shifting keeps a padded row equal to the row alone, and equals peft whenever there is no padding.
            kwargs["position_ids"] = positions + n
        cache = kwargs.get(cache_key(model, kwargs))
        if cache is None or cache.get_seq_length() == 0:
            self.feed(model, kwargs, self.prompts(names))
        return (), kwargs

    def after(self, model, args, kwargs, output):
        real, self.real = self.real, None
        logits = getattr(output, "logits", None)
        if real is not None and logits is not None and logits.shape[1] > real:
            output.logits = logits[:, -real:]  # (B, T, V): the virtual positions dropped
        return output

    # ---- which prompts ----

    def feeding(self, model: nn.Module, batch: int) -> list[str] | None:
        """The adapter of each row of the batch, or None when this module is idle."""
        if self.rows is None and not self.active:
            return None
        busy = [n for m in model.children() if isinstance(m, InputAdapters) for n in (m.rows or m.active)]
        if self.rows is None and len(set(busy)) > 1:
            raise LlmlabError(f"only one prompt or prefix adapter can feed the model at a time, but "
                              f"{', '.join(dict.fromkeys(busy))} are active; pick one with set_adapter(model, name)")
        if self.rows is None:
            return self.active * batch
        if len(self.rows) != batch:
            raise LlmlabError(f"per_row got {len(self.rows)} adapter names for a batch of {batch} rows")
        if len({self.adapters[n].cfg.virtual_tokens for n in self.rows}) > 1:
            raise LlmlabError("prompts of different lengths cannot share a batch; give them the same "
                              "virtual_tokens or run them one at a time")
        return self.rows

    def prompts(self, names: list[str]) -> torch.Tensor:
        """(B, n, w): row b gets the prompt of adapter names[b]; each prompt is computed once."""
        made = {name: self.adapters[name]() for name in dict.fromkeys(names)}  # (n, w) each
        if len(made) == 1:
            return next(iter(made.values())).expand(len(names), -1, -1)
        return torch.stack([made[name] for name in names])

    @contextmanager
    def per_row(self, names: list[str]):
        """Run one batch with a different adapter per row (one name per row), e.g. an ensemble."""
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise LlmlabError(f"no {self.method} adapter named '{missing[0]}'; this model has "
                              f"{', '.join(self.adapters) or 'none'}")
        self.rows = list(names)
        try:
            yield
        finally:
            self.rows = None

    # ---- saving and loading ----

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        """{"prompt_embeddings": P}: the parameter itself once baked, so loading can copy into it."""
        adapter = self.adapters[name]
        return {"prompt_embeddings": adapter.weight if isinstance(adapter, SoftPrompt) else derived(adapter)}

    def bake(self, name: str):
        """Replace adapter `name`'s encoder by the prompt it computes (peft's inference form)."""
        adapter = self.adapters[name]
        if isinstance(adapter, SoftPrompt):
            return
        trainable = any(p.requires_grad for p in adapter.parameters())
        self.adapters[name] = SoftPrompt(adapter.cfg, derived(adapter)).requires_grad_(trainable)


def cache_key(model, kwargs: dict) -> str:
    """The keyword the KV cache travels by: the one the caller passed (transformers' generate and llmlab's
    decoder say `cache` from transformers 5.25 on and ignore `past_key_values` beside it), else the one
    the model's forward takes."""
    if kwargs.get("cache") is not None:
        return "cache"
    if "past_key_values" in kwargs:
        return "past_key_values"
    return "cache" if "cache" in kwargs else cache_argument(type(model))


def derived(adapter: nn.Module) -> torch.Tensor:
    """The prompt an encoder makes, in eval mode (no dropout), detached."""
    was_training = adapter.training
    adapter.eval()
    with torch.no_grad():
        prompt = adapter().detach().clone()
    adapter.train(was_training)
    return prompt


def add_input_adapter(model: nn.Module, kind: type, name: str, adapter: nn.Module) -> nn.Module:
    """Attach `adapter` under `name`, make it the active adapter and the only trainable part."""
    if name in adapter_names(model):
        raise LlmlabError(f"an adapter named '{name}' already exists; pick another name")
    kind.on(model).add(name, adapter.to(next(model.parameters()).device))
    set_adapter(model, name)
    mark_trainable(model, name)
    return model


def peft_fields(model: nn.Module, cfg) -> dict:
    """The adapter_config.json fields every peft prompt-learning method writes."""
    config = model.config.get_text_config()
    return {"num_virtual_tokens": cfg.virtual_tokens, "num_transformer_submodules": 1,
            "num_layers": config.num_hidden_layers, "token_dim": config.hidden_size,
            "num_attention_heads": config.num_attention_heads, "modules_to_save": None}


def virtual_tokens(fields: dict) -> int:
    """num_virtual_tokens of a peft prompt-learning adapter_config.json, for a decoder-only model."""
    if fields.get("num_transformer_submodules") not in (None, 1):
        raise LlmlabError("this adapter was made for an encoder-decoder model; llmlab runs decoder-only models")
    return int(fields["num_virtual_tokens"])


def _batch_size(kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise LlmlabError("the model was called without input_ids or inputs_embeds")

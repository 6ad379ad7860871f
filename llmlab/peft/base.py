"""What every adapter method shares: named adapters, switching, disabling, merging, counting.

An adapter method swaps modules. A weight method (LoRA, DoRA, IA3, bottleneck adapters) wraps a
layer in an `AdapterLayer` that keeps the original as `base_layer`; an input-side method
(prefix, prompt, P-tuning) adds one `Adapters` module that feeds the model. Both hold their
adapters in a ModuleDict keyed by adapter name, so one frozen base model carries several
adapters at once and `set_adapter` switches between them without reloading anything.

The functions here act on the whole model: they visit every `Adapters` module in it.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from torch import nn

from llmlab.errors import LlmlabError, closest
from llmlab.models.surgery import set_module

DEFAULT = "default"


class Adapters(nn.Module):
    """A module holding named adapters of one method, of which `active` are used."""

    method = ""  # the name in llmlab.peft.METHODS, set by each subclass

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []

    def add(self, name: str, adapter: nn.Module):
        if name in self.adapters:
            raise LlmlabError(f"an adapter named '{name}' already exists; pick another name")
        self.adapters[name] = adapter

    def remove(self, name: str):
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]


class AdapterLayer(Adapters):
    """Wraps one layer; subclasses define forward() and, where the method allows, merging."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.merged: list[str] = []

    def running(self) -> list[str]:
        """The active adapters not already folded into the base weight."""
        return [a for a in self.active if a not in self.merged]

    def merge(self, name: str):
        raise LlmlabError(f"{self.method} adapters cannot be merged into the base weights")

    def unmerge(self, name: str):
        raise LlmlabError(f"{self.method} adapters cannot be merged into the base weights")

    def __getattr__(self, name: str):
        # let code that reads e.g. `layer.weight` or `layer.in_features` see the wrapped layer
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)


def adapter_modules(model: nn.Module) -> list[tuple[str, Adapters]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Adapters)]


def adapter_names(model: nn.Module) -> list[str]:
    names = {}
    for _, module in adapter_modules(model):
        names.update(dict.fromkeys(module.adapters))
    return list(names)


def adapter_method(model: nn.Module, name: str) -> str:
    for _, module in adapter_modules(model):
        if name in module.adapters:
            return module.method
    raise _no_adapter(model, name)


def _no_adapter(model: nn.Module, name: str) -> LlmlabError:
    names = adapter_names(model)
    return LlmlabError(f"no adapter named '{name}'{closest(name, names)}; the model has: "
                       f"{', '.join(names) or 'none'}")


def set_adapter(model: nn.Module, names: str | list[str]):
    """Make `names` the active adapters everywhere (the others stay loaded, unused)."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in adapter_names(model):
            raise _no_adapter(model, name)
    for _, module in adapter_modules(model):
        if getattr(module, "merged", None):
            raise LlmlabError("unmerge the adapters before switching: merged weights cannot be switched off")
        module.active = [n for n in names if n in module.adapters]


def active_adapters(model: nn.Module) -> list[str]:
    active = {}
    for _, module in adapter_modules(model):
        active.update(dict.fromkeys(module.active))
    return list(active)


@contextmanager
def disabled(model: nn.Module):
    """Run the base model: no adapter applies inside the block (e.g. DPO's reference model)."""
    modules = adapter_modules(model)
    if any(getattr(m, "merged", None) for _, m in modules):
        raise LlmlabError("cannot disable merged adapters; unmerge them first")
    saved = [m.active for _, m in modules]
    for _, m in modules:
        m.active = []
    try:
        yield model
    finally:
        for (_, m), active in zip(modules, saved):
            m.active = active


@contextmanager
def using_adapter(model: nn.Module, name: str | None):
    """Run with adapter `name` active ("base": none at all; None: leave as is), then switch back."""
    if name is None:
        yield model
        return
    if name == "base":
        with disabled(model):
            yield model
        return
    previous = {id(m): m.active for _, m in adapter_modules(model)}
    set_adapter(model, name)
    try:
        yield model
    finally:
        for _, module in adapter_modules(model):
            module.active = previous[id(module)]


def delete_adapter(model: nn.Module, name: str):
    """Remove an adapter; layers left with none go back to their plain base layer."""
    if name not in adapter_names(model):
        raise _no_adapter(model, name)
    for path, module in adapter_modules(model):
        if name in module.adapters:
            module.remove(name)
            if not module.adapters:
                _unwrap(model, path, module)


def merge(model: nn.Module, names: list[str] | None = None):
    """Fold adapters (default: the active ones) into the base weights; undo with `unmerge`."""
    # innermost wrappers first: an outer adapter acts on what the inner ones compute, so it folds
    # into the weight only after they have (unmerge goes the other way round)
    for _, module in reversed(adapter_modules(model)):
        for name in names if names is not None else module.active:
            if name not in module.adapters or name in getattr(module, "merged", []):
                continue
            if not isinstance(module, AdapterLayer):
                raise LlmlabError(f"{module.method} adapters feed the model's input and cannot be "
                                  f"merged into its weights; keep the adapter, or use lora/dora/ia3")
            _check_inner_merged(module, name)
            module.merge(name)
            module.merged.append(name)


def _check_inner_merged(module: AdapterLayer, name: str):
    """An adapter merged into a weight that inner, unmerged adapters still act on would change their output."""
    inner = module.base_layer
    while isinstance(inner, AdapterLayer):
        if inner.running():
            raise LlmlabError(f"cannot merge adapter '{name}' alone: the layer's {inner.method} adapters "
                              f"{', '.join(inner.running())} sit inside it and would see the merged weight; "
                              f"merge them too (merge with no names merges all active adapters)")
        inner = inner.base_layer


def unmerge(model: nn.Module):
    for _, module in adapter_modules(model):
        for name in reversed(getattr(module, "merged", [])):
            module.unmerge(name)
        if isinstance(module, AdapterLayer):
            module.merged = []


def merge_and_unload(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Merge adapters and put the plain layers back: a standard model with no extra latency."""
    merge(model, names)
    for path, module in reversed(adapter_modules(model)):  # inner first: an outer unwrap moves the inner ones
        _unwrap(model, path, module)
    return model


def _unwrap(model: nn.Module, path: str, module: Adapters):
    if isinstance(module, AdapterLayer):
        set_module(model, path, module.base_layer)
    elif hasattr(module, "detach"):  # input-side methods remove their hooks
        module.detach(model)


def mark_trainable(model: nn.Module, name: str = DEFAULT):
    """Train adapter `name` only: the base model and any other adapters stop taking gradients."""
    model.requires_grad_(False)
    for _, module in adapter_modules(model):
        if name in module.adapters:
            module.adapters[name].requires_grad_(True)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module):
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")


@dataclass(frozen=True)
class Method:
    """What llmlab.peft needs to know about one method to apply, save and load it."""

    config: type                      # the method's Config dataclass
    apply: Callable                   # apply(model, cfg, name) -> model, in place
    peft_type: str | None = None      # HF peft's name for it; None: llmlab's own format only
    to_peft: Callable | None = None   # cfg -> adapter_config.json fields
    from_peft: Callable | None = None  # adapter_config.json dict -> cfg, or None if not this method

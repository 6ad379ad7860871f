"""Choose the modules an adapter wraps, by name or regular expression.

Matching follows HF peft so that adapter configs mean the same thing in both tools: a list
entry matches a module whose full name equals it or ends with "." + entry (`q_proj` matches
`model.layers.3.self_attn.q_proj`); `regex` must match the whole name. `all-linear` targets
every linear layer except the output head. Defaults per architecture live in targets.yaml.
"""

import re
from functools import cache
from importlib import resources

import yaml
from torch import nn

from llmlab.errors import LlmlabError
from llmlab.models.surgery import device_of, innermost, is_linear, is_quantized, linear_weight, set_module

ALL_LINEAR = "all-linear"
MERGE_QUANTIZED = ("merge_and_unload needs a float base; dequantize first: this adapter sits on a quantized layer, "
                   "so merge it into the unquantized model instead (llmlab merge --model FLOAT_MODEL --adapter RUN)")


@cache
def _defaults() -> dict:
    return yaml.safe_load(resources.files("llmlab.peft").joinpath("targets.yaml").read_text())


def default_targets(model: nn.Module, table: str = "lora") -> list[str]:
    """The modules peft would pick for this architecture (`table` is lora, ia3, ia3_feedforward)."""
    model_type = getattr(model.config, "model_type", "")
    names = _defaults()[table].get(model_type)
    if names is None:
        raise LlmlabError(f"no default target modules for model type '{model_type}'; name them "
                          f"with targets (e.g. --adapter.targets q_proj,v_proj) or use all-linear")
    return list(names)


def peft_targets(cfg, model: nn.Module, table: str = "lora") -> str | list[str]:
    """target_modules as peft reads it: the regex, "all-linear" (a string, not a list), or module names."""
    if cfg.regex:
        return cfg.regex
    return ALL_LINEAR if cfg.targets == [ALL_LINEAR] else (cfg.targets or default_targets(model, table))


def read_targets(fields: dict) -> tuple[list[str], str | None]:
    """(targets, regex) from a peft config's target_modules."""
    targets = fields.get("target_modules") or []
    if isinstance(targets, str):
        return ([ALL_LINEAR], None) if targets.lower() == ALL_LINEAR else ([], targets)
    return sorted(targets), None


def weight_of(module: nn.Module):
    """The (out_features, in_features) weight of a linear layer (or of the one an adapter wraps), for either
    storage order; a view, so writing to it writes the layer's weight. A quantized layer has none to write
    (merging into it would need re-quantizing): LlmlabError."""
    module = innermost(module)
    if is_quantized(module):
        raise LlmlabError(MERGE_QUANTIZED)
    return linear_weight(module)


def read_weight(module: nn.Module):
    """The (out, in) weight the layer multiplies by, for reading: dequantized (a new tensor) if quantized."""
    module = innermost(module)
    return module.dequantized_weight() if is_quantized(module) else weight_of(module)


def matches(name: str, targets: list[str], regex: str | None = None) -> bool:
    if regex is not None:
        return re.fullmatch(regex, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: list[str], regex: str | None = None,
                 kind=is_linear) -> list[str]:
    """Names of the modules to wrap: those that match and are of the wrapped kind.

    A module already wrapped by an adapter layer counts by its own name (not `…base_layer`), so a
    second adapter attaches to the same wrapper.
    """
    if targets == [ALL_LINEAR] and regex is None:
        head = _head_name(model)
        return [n for n, m in _candidates(model, kind) if n != head]
    found = [n for n, m in _candidates(model, kind) if matches(n, targets, regex)]
    if not found:
        wanted = f"regex '{regex}'" if regex is not None else ", ".join(targets)
        raise LlmlabError(f"target modules ({wanted}) match no layer of {type(model).__name__}; "
                          f"its layers are named: {', '.join(_short_names(model, kind))}")
    return found


def _candidates(model: nn.Module, kind):
    for name, module in model.named_modules():
        base = innermost(module)
        if kind(base) and not name.endswith("base_layer") and not _inside_wrapper(name):
            yield name, module


def _inside_wrapper(name: str) -> bool:
    # adapter parameters (e.g. a LoRA's A and B) are linear layers too, but never targets
    return ".adapters." in f".{name}." or ".base_layer." in f".{name}."


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None)


def _short_names(model: nn.Module, kind) -> list[str]:
    """Unique last parts of the candidate names, e.g. q_proj, k_proj, …, lm_head."""
    seen = {}
    for name, _ in _candidates(model, kind):
        seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def wrap_targets(model: nn.Module, cfg, name: str, wrapper: type, make, table: str = "lora") -> list[str]:
    """Wrap each targeted layer in `wrapper` (once) and add the adapter `make(layer)` under `name`."""
    targets = cfg.targets or ([] if cfg.regex else default_targets(model, table))
    names = find_targets(model, targets, cfg.regex, kind=is_linear)
    for path in names:
        layer = model.get_submodule(path)
        if not isinstance(layer, wrapper):
            layer = wrapper(layer)
            set_module(model, path, layer)
        adapter = make(layer._modules["base_layer"])
        layer.add(name, adapter.to(device_of(layer._modules["base_layer"])))
    return names

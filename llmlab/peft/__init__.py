"""Parameter-efficient fine-tuning: one file per method, each a Config dataclass + apply_<method>.

    model = apply_lora(model, LoraConfig(r=16))       # or apply_method(model, "lora", {"r": 16})
    save_adapter(model, "out/adapter")                # HF peft's format
    load_adapter(base, "out/adapter", name="math")    # several named adapters on one base
    set_adapter(base, "math"); with disabled(base): ...
    merge_and_unload(model)                           # LoRA, DoRA, IA3
"""

from inspect import signature

from llmlab import methods
from llmlab.config import build
from llmlab.peft.adapter import AdapterConfig, apply_adapter
from llmlab.peft.base import (DEFAULT, active_adapters, adapter_names, delete_adapter, disabled, mark_trainable, merge,
                              merge_and_unload, print_trainable_parameters, set_adapter, trainable_parameters, unmerge,
                              using_adapter)
from llmlab.peft.dora import DoraConfig, apply_dora
from llmlab.peft.freeze import FreezeConfig, FullConfig, apply_freeze, apply_full
from llmlab.peft.ia3 import IA3Config, apply_ia3
from llmlab.peft.io import load_adapter, save_adapter
from llmlab.peft.lora import LoraConfig, apply_lora
from llmlab.peft.prefix import PrefixConfig, PTuningV2Config, apply_prefix, apply_ptuning2
from llmlab.peft.prompt import PromptConfig, apply_prompt, ensemble
from llmlab.peft.ptuning import PTuningConfig, apply_ptuning


def apply_method(model, method: str, options: dict | None = None, name: str = DEFAULT, tokenizer=None):
    """apply_<method>(model, Config(**options), name), with the options checked by the Config.

    `tokenizer` reaches the methods that read text (prompt tuning initialised from a text).
    """
    cfg_cls, apply, _ = methods.load("finetune", method)
    extra = {"tokenizer": tokenizer} if tokenizer is not None and "tokenizer" in signature(apply).parameters else {}
    return apply(model, build(cfg_cls, options or {}, method), name, **extra)


__all__ = ["DEFAULT", "apply_method", "LoraConfig", "apply_lora", "DoraConfig", "apply_dora",
           "IA3Config", "apply_ia3", "AdapterConfig", "apply_adapter",
           "FreezeConfig", "apply_freeze", "FullConfig", "apply_full",
           "PrefixConfig", "apply_prefix", "PTuningV2Config", "apply_ptuning2", "PromptConfig", "apply_prompt",
           "ensemble", "PTuningConfig", "apply_ptuning", "save_adapter", "load_adapter",
           "set_adapter", "active_adapters", "adapter_names", "delete_adapter", "disabled", "merge", "unmerge",
           "merge_and_unload", "using_adapter", "mark_trainable", "trainable_parameters", "print_trainable_parameters"]

"""Model compression: one file per method, each a `<Method>Config` dataclass + `quantize_<method>`.

    model = quantize_rtn(model, None, RTNConfig(bits=4, group_size=128))
    model = quantize_model(model, "gptq", calib, bits=4, group_size=128)   # by name, options checked
    save_quantized(model, tokenizer, "out/w4g128")                         # load_model("out/w4g128") reads it

Quantized layers are modules (`qlinear.QuantizedLinear`) swapped in for `nn.Linear`, so the
other stages (generate, chat, eval ppl, finetune with LoRA) take a quantized model as it is.
Methods are imported only when asked for: the table below names where each one lives.
"""

import importlib
from typing import NamedTuple

from llmlab.errors import LlmlabError, closest


class MethodEntry(NamedTuple):
    module: str        # llmlab.compress.<module>
    config: str        # its <Name>Config dataclass
    function: str      # quantize_<name>(model, calib, cfg) -> model
    needs_calib: bool  # whether it reads calibration text


# `llmlab quantize --method NAME` and `quantize_model(model, NAME, …)` dispatch through this table.
METHODS: dict[str, MethodEntry] = {
    "rtn": MethodEntry("rtn", "RTNConfig", "quantize_rtn", False),
    "gptq": MethodEntry("gptq", "GPTQConfig", "quantize_gptq", True),
    "awq": MethodEntry("awq", "AWQConfig", "quantize_awq", True),
    "smoothquant": MethodEntry("smoothquant", "SmoothQuantConfig", "quantize_smoothquant", True),
    "llm_int8": MethodEntry("llm_int8", "LLMInt8Config", "quantize_llm_int8", False),
    "zeroquant": MethodEntry("zeroquant", "ZeroQuantConfig", "quantize_zeroquant", False),
    "nf4": MethodEntry("nf4", "NF4Config", "quantize_nf4", False),
}


def get_method(name: str):
    """(config class, quantize function, needs_calib) of a method, importing only its file."""
    entry = import_entry("quantization", name, METHODS)
    return entry[0], entry[1], METHODS[name].needs_calib


def import_entry(kind: str, name: str, table: dict) -> tuple:
    """(config class, function) of table[name], importing only llmlab/compress/<module>.py."""
    if name not in table:
        raise LlmlabError(f"unknown {kind} method '{name}'{closest(name, table)}; choose one of {', '.join(table)}")
    entry = table[name]
    try:
        module = importlib.import_module(f"llmlab.compress.{entry.module}")
    except ModuleNotFoundError as e:
        if e.name != f"llmlab.compress.{entry.module}":
            raise
        raise LlmlabError(f"{kind} method '{name}' is not available in this llmlab "
                          f"(no llmlab/compress/{entry.module}.py)") from None
    return getattr(module, entry.config), getattr(module, entry.function)


def quantize_model(model, method: str, calib=None, **options):
    """quantize_<method>(model, calib, Config(**options)) with the options checked; see quantize.py."""
    from llmlab.compress.quantize import quantize_model as run

    return run(model, method, calib, **options)


def save_quantized(model, tokenizer, out):
    from llmlab.compress.io import save_quantized as save

    return save(model, tokenizer, out)


def load_quantized(folder, dtype="fp32"):
    from llmlab.compress.io import load_quantized as load

    return load(folder, dtype)


__all__ = ["METHODS", "MethodEntry", "get_method", "import_entry", "quantize_model", "save_quantized", "load_quantized"]

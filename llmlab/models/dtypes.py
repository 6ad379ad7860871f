"""The dtype and device names every verb takes (`--dtype bf16`, `--device auto`)."""

import torch

from llmlab.errors import LlmlabError, closest

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise LlmlabError(f"unknown dtype '{name}'{closest(name, DTYPES)}; use fp32, bf16 or fp16")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LlmlabError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LlmlabError(f"device '{name}' asked for, but this torch sees no CUDA GPU; use --device cpu")
    return device

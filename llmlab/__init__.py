"""llmlab: a causal language model's whole life on ordinary hardware.

The public Python API, imported lazily so that `llmlab --help` does not wait for torch:

    from llmlab import load_model, generate, perplexity, SamplingConfig
    model, tok = load_model("smollm2-135m", dtype="bf16")
    print(generate(model, tok, "What is the capital of France?", chat=True))
    print(perplexity(model, tok, open("wiki.valid.raw").read(), seq_len=2048)["ppl"])
"""

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "llmlab.models", "save_model": "llmlab.models", "decoder_layers": "llmlab.models",
    "context_length": "llmlab.models",
    "generate": "llmlab.generation.generate", "SamplingConfig": "llmlab.generation.generate",
    "perplexity": "llmlab.evaluate.perplexity",
    "Registry": "llmlab.runs", "LlmlabError": "llmlab.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'llmlab' has no attribute '{name}'")

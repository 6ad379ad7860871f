"""Every model is a transformers causal LM with its tokenizer; these find, load and save them."""

from llmlab.models import lab, llmlab_llama  # noqa: F401  (register "llmlab_lab" and "llmlab_llama" with the Auto classes)
from llmlab.models.builtin import BUILTIN_NAME
from llmlab.models.dtypes import resolve_device, resolve_dtype
from llmlab.models.layers import decoder_layers
from llmlab.models.load import ModelOptions, context_length, load_model, model_names, save_model

__all__ = ["BUILTIN_NAME", "ModelOptions", "context_length", "decoder_layers", "load_model", "model_names",
           "resolve_device", "resolve_dtype", "save_model"]

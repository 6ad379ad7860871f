"""Tiny random models and a byte-level tokenizer, for tests that must run in seconds offline.

The tokenizer maps each UTF-8 byte to one token (256 tokens) plus ChatML special tokens, so
any text round-trips and no vocabulary file is needed.
"""

from importlib import resources

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 320  # 256 bytes + specials, rounded up to a multiple of 64


def tiny_configs() -> dict:
    return yaml.safe_load(resources.files("llmlab.models").joinpath("tiny.yaml").read_text())


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    template = resources.files("llmlab.models").joinpath("chatml.txt").read_text()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token=None, chat_template=template)


def tiny_model(name: str, seed: int = 0):
    """A randomly initialised model of the named tiny config, the same weights for the same seed."""
    fields = dict(tiny_configs()[name])
    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model(
        fields.pop("model_type"), vocab_size=VOCAB_SIZE,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

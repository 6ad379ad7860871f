"""Small causal-LM examples and a loss for exercising the training loop on tiny-llama."""

import functools

import torch

from llmlab.data.packing import collate
from llmlab.models import load_model
from llmlab.train.losses import sft_loss

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof",
             "she reads a long book", "we walk to the river", "the sun is warm today", "he plays the old piano",
             "fish swim in the lake", "snow covers the hill"]


def examples(tokenizer, n: int = len(SENTENCES)) -> list[dict]:
    out = []
    for text in SENTENCES[:n]:
        ids = tokenizer(text)["input_ids"]
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def tiny(dropout: float = 0.0):
    """A fresh tiny-llama (same weights every time), optionally with attention dropout on."""
    model, tokenizer = load_model("tiny-llama")
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = dropout
    return model, tokenizer


def batches(tokenizer):
    return functools.partial(collate, pad_id=tokenizer.pad_token_id)


loss_fn = sft_loss
__all__ = ["batches", "examples", "loss_fn", "tiny", "torch"]

"""A teacher, a one-layer student and a few collated examples, shared by the method tests."""

import torch

from llmlab.data.packing import IGNORE, collate
from llmlab.distill.student import drop_layers
from llmlab.models import load_model

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 4


def pair():
    teacher, tok = load_model("tiny-llama")
    return teacher.requires_grad_(False), drop_layers(teacher, [1]), tok


def batch(tok, n=3, length=24, prompt=0):
    """n right-padded rows of different lengths; the first `prompt` tokens of each carry no label."""
    ids = tok(TEXT).input_ids
    rows = []
    for i in range(n):
        row = ids[i * 7:i * 7 + length - 3 * i]
        head = min(max(prompt, 1), len(row) - 1)  # at least the last token is a target
        rows.append({"input_ids": row, "labels": [IGNORE] * head + row[head:]})
    return collate(rows, tok.pad_token_id)


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]

"""Packed rows: every example's logits and loss are exactly what it gets alone."""

import pytest
import torch

from llmlab.data.packing import block_causal_mask, collate, model_inputs, pack, packing_mode
from llmlab.models import load_model
from llmlab.train.losses import sft_loss

LENGTHS = [7, 12, 5, 9, 3, 11]


def _examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def test_pack_fills_rows_with_whole_examples_and_restarts_positions():
    rows = pack(_examples(), max_len=20)
    assert [len(r["input_ids"]) for r in rows] == [19, 17, 11]  # 7+12 | 5+9+3 | 11
    assert rows[1]["position_ids"] == [*range(5), *range(9), *range(3)]
    mask = block_causal_mask(torch.tensor([[0, 1, 2, 0, 1]]))[0, 0]
    assert mask.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]


@pytest.mark.parametrize("name, attn, mode", [
    ("tiny-llama", "sdpa", "position_ids"), ("tiny-llama", "eager", "position_ids"),
    ("tiny-opt", "sdpa", "mask"), ("tiny-opt", "eager", "mask")])
@torch.no_grad()
def test_packed_logits_equal_each_example_alone(name, attn, mode):
    model, _ = load_model(name)
    model.set_attn_implementation(attn)
    assert packing_mode(model) == mode  # OPT's mask code ignores position ids: it needs the 4D mask
    examples = _examples()
    batch = collate(pack(examples, max_len=20), pad_id=0, block_mask=mode == "mask")
    logits = model(**model_inputs(model, batch)).logits  # (rows, T, V)
    row, offset = 0, 0
    for ex in examples:
        n = len(ex["input_ids"])
        if offset + n > 20 or batch["position_ids"][row, offset] != 0:
            row, offset = row + 1, 0
        alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
        torch.testing.assert_close(logits[row, offset:offset + n], alone, atol=1e-5, rtol=1e-5)
        offset += n


def test_packed_loss_equals_unpacked_loss():
    model, _ = load_model("tiny-llama")
    examples = _examples()
    packed_loss, packed_n = sft_loss(model, collate(pack(examples, 20), pad_id=0))
    plain_loss, plain_n = sft_loss(model, collate(examples, pad_id=0))
    assert packed_n == plain_n == sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(packed_loss, plain_loss, atol=1e-4, rtol=1e-6)

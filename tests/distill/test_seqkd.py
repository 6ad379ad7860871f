import pytest
import torch

from llmlab.data.packing import IGNORE
from llmlab.distill.seqkd import SeqKDConfig, prompt_of, prompts_of, seqkd_data
from llmlab.errors import LlmlabError
from tests.distill.helpers import batch, pair


def test_prompts_are_the_unlabelled_heads():
    assert prompt_of([1, 2, 3, 4, 5], [IGNORE, IGNORE, 3, 4, 5], prompt_len=1) == [1, 2]
    assert prompt_of([1, 2, 3, 4, 5], [IGNORE, 2, 3, 4, 5], prompt_len=3) == [1, 2, 3]  # plain text: prompt_len
    assert prompt_of([1, 2, 3], [IGNORE, 2, 3], prompt_len=10) == [1, 2]  # at least one token is left to complete
    _, _, tok = pair()
    b = batch(tok, prompt=6)
    lengths = b["attention_mask"].sum(-1).tolist()
    assert [len(p) for p in prompts_of(b, 2)] == [6, 6, 6]
    assert prompts_of(b, 2)[2] == b["input_ids"][2, :6].tolist() and lengths[2] < lengths[0]


def test_teacher_generations_equal_transformers_greedy():
    """The oracle: transformers' own greedy generate from the same prompts."""
    teacher, _, tok = pair()
    examples = [{"input_ids": ids, "labels": [IGNORE] + ids[1:]} for ids in (tok("To be or").input_ids,
                                                                                  tok("not to be, that").input_ids)]
    out = seqkd_data(teacher, tok, examples, SeqKDConfig(prompt_len=3, max_new_tokens=5, temperature=0.0))
    assert len(out) == 2
    for example, original in zip(out, examples):
        prompt = original["input_ids"][:3]
        with torch.no_grad():
            ref = teacher.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0].tolist()
        assert example["input_ids"] == ref[:len(example["input_ids"])]
        assert example["labels"] == [IGNORE] * 3 + example["input_ids"][3:]
    kept = seqkd_data(teacher, tok, examples, SeqKDConfig(prompt_len=3, max_new_tokens=2, keep_data=True))
    assert len(kept) == 4 and kept[2:] == examples


def test_rollout_checks():
    with pytest.raises(LlmlabError, match="max_new_tokens"):
        SeqKDConfig(max_new_tokens=0)
    with pytest.raises(LlmlabError, match="top_p"):
        SeqKDConfig(top_p=0)

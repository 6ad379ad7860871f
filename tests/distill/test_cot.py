import pytest
import torch
import torch.nn.functional as F

from llmlab.distill.cot import CoTConfig, agrees, cot_collate, cot_data, cot_loss, parse_row
from llmlab.errors import LlmlabError
from tests.distill.helpers import pair

GSM = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
       "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"}
TASK = {"instruction": "What is 47 + 385?", "input": "", "output": "432"}


def test_rows_are_parsed_into_question_answer_rationale():
    q, a, r = parse_row(GSM, "row 1")
    assert a == "72" and q.startswith("Natalia") and r == "Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72."
    assert parse_row(TASK, "row 1") == ("What is 47 + 385?", "432", None)
    with pytest.raises(LlmlabError, match="row 3"):
        parse_row({"text": "x"}, "row 3")


def test_final_answer_check():
    assert agrees("so 48 + 24 = 72. The answer is 72.", "72")
    assert not agrees("so 48 + 24 = 72. The answer is 71", "72")
    assert agrees("total 1,200", "1200")
    assert agrees("reversed:\nthe answer is TNALP", "tnalp")
    assert not agrees("", "72")


def test_two_tasks_per_row_with_their_weights():
    _, _, tok = pair()
    examples, stats = cot_data(None, tok, [GSM, GSM], CoTConfig(source="data", rationale_weight=0.25))
    assert stats == {"rows": 2, "rationales": 2, "rationales_dropped": 0} and len(examples) == 4
    label, rationale = examples[0], examples[1]
    assert (label["weight"], rationale["weight"]) == (1.0, 0.25)
    target = tok.decode([t for t, y in zip(label["input_ids"], label["labels"]) if y != -100])
    assert target.startswith("72") and "[label] Natalia" in tok.decode(label["input_ids"])
    assert "24 clips" in tok.decode([t for t, y in zip(rationale["input_ids"], rationale["labels"]) if y != -100])


def test_loss_weights_each_task():
    _, student, tok = pair()
    examples, _ = cot_data(None, tok, [GSM], CoTConfig(source="data", rationale_weight=0.5))
    b = cot_collate(examples, tok.pad_token_id)
    loss, n = cot_loss(student, b)
    logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    per_row = [F.cross_entropy(logits[i, :-1], b["labels"][i, 1:], ignore_index=-100, reduction="sum") for i in (0, 1)]
    torch.testing.assert_close(loss, per_row[0] + 0.5 * per_row[1])
    assert n == int((b["labels"][:, 1:] != -100).sum())


def test_teacher_rationales_are_generated_and_filtered():
    teacher, _, tok = pair()
    cfg = CoTConfig(max_new_tokens=6, filter=True)
    examples, stats = cot_data(teacher, tok, [GSM, TASK], cfg)  # a random tiny teacher is never right
    assert stats["rationales"] == 0 and len(examples) == 2
    examples, stats = cot_data(teacher, tok, [GSM, TASK], CoTConfig(max_new_tokens=6, filter=False))
    assert stats["rationales"] + stats["rationales_dropped"] == 2 and len(examples) == 2 + stats["rationales"]


def test_data_source_needs_rationales():
    _, _, tok = pair()
    with pytest.raises(LlmlabError, match="source teacher"):
        cot_data(None, tok, [TASK], CoTConfig(source="data"))
    with pytest.raises(LlmlabError, match="source"):
        CoTConfig(source="gold")

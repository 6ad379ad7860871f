"""ARC: the three file formats, lm-eval parity (0-shot and seeded k-shot, acc and acc_norm), bad rows, CLI."""

import json

import pytest

from llmlab.cli import main
from llmlab.errors import LlmlabError
from llmlab.evaluate.arc import arc_items, evaluate_arc, load_subset, read_arc
from llmlab.models import load_model, save_model
from tests.conftest import SHARED_DATA

CHOICES = [["dry palms", "wet palms", "oil", "palms covered with lotion"], ["a gas", "solid", "liquid"],
           ["up", "down", "left", "right", "no way at all"]]


def adapters_row(i):
    choices = CHOICES[i % 3]
    listed = " ".join(f"Answer{j + 1}: {c}" for j, c in enumerate(choices))
    fmt = "/".join(f"answer{j + 1}" for j in range(len(choices)))
    return {"instruction": f"Please choose the correct answer to the question: Which is {i}?\n\n{listed}\n\n"
                           f"Answer format: {fmt}",
            "input": "", "output": "", "answer": f"answer{i % len(choices) + 1}"}


def write_arc(root, n_train=8, n_test=5):
    """LLM-Adapters .json for train (as in ../shared/data/arc), hub-style .jsonl for test."""
    for name in ("ARC-Easy", "ARC-Challenge"):
        (root / name).mkdir(parents=True)
        (root / name / "train.json").write_text(json.dumps([adapters_row(i) for i in range(n_train)]))
        rows = [{"id": str(i), "question": f"Test question {i} of {name}?",
                 "choices": {"text": CHOICES[i % 3], "label": list("ABCDE"[:len(CHOICES[i % 3])])},
                 "answerKey": "ABCDE"[i % len(CHOICES[i % 3])]} for i in range(n_test)]
        (root / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_reads_all_three_formats(tmp_path):
    q = read_arc(SHARED_DATA / "arc" / "ARC-Easy" / "train.json")[0]
    assert q.question == "Which factor will most likely cause a person to develop a fever?"
    assert q.choices[1] == "a bacterial population in the bloodstream" and q.gold == 1 and len(q.choices) == 4
    allen = {"question": {"stem": "Why?", "choices": [{"text": "x", "label": "1"}, {"text": "y", "label": "2"}]},
             "answerKey": "2"}
    hub = {"question": "Why?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}
    (tmp_path / "t.jsonl").write_text(json.dumps(allen) + "\n\n" + json.dumps(hub) + "\n")
    assert [(q.question, q.choices, q.gold) for q in read_arc(tmp_path / "t.jsonl")] == [("Why?", ["x", "y"], 1)] * 2
    five = read_arc(write_arc(tmp_path / "arc") / "ARC-Easy" / "train.json")[2]
    assert five.choices == CHOICES[2] and five.gold == 2


@pytest.mark.parametrize("row, message", [
    ({"instruction": "Choose: x", "answer": "answer1"}, r"t.json row 2: the instruction is not"),
    ({**adapters_row(0), "answer": "answer7"}, r"t.json row 2: the answer 'answer7' is not one of answer1/answer2"),
    ({"question": "Why?", "choices": {"text": ["x"], "label": ["A"]}, "answerKey": "C"},
     r"t.json row 2: answerKey 'C' is not one of the labels A"),
    ({"question": "Why?"}, r"t.json row 2: needs 'question' and 'answerKey'"),
])
def test_malformed_rows_name_file_and_row(tmp_path, row, message):
    (tmp_path / "t.json").write_text(json.dumps([adapters_row(0), row]))
    with pytest.raises(LlmlabError, match=message):
        read_arc(tmp_path / "t.json")


def test_prompt_is_lm_evals():
    q = read_arc(SHARED_DATA / "arc" / "ARC-Challenge" / "train.json")[:3]
    item = arc_items("challenge", q)[0]
    assert item.context == f"Question: {q[0].question}\nAnswer:" and item.choices == q[0].choices
    shot = arc_items("challenge", q, q, k=1, same_split=True)[2]
    assert shot.context.startswith("Question: ") and shot.context.count("\nAnswer: ") == 1


@pytest.mark.parametrize("k", [0, 2])
def test_scores_equal_lm_evals(tmp_path, k):
    """lm-eval's arc_easy/arc_challenge on the same files with HFLM: same contexts, lls, acc and acc_norm."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmlab.evaluate.lm_eval_adapter import arc_task

    data = write_arc(tmp_path / "arc")
    folder = tmp_path / "model"
    save_model(*load_model("tiny-llama"), folder)
    names = [arc_task(tmp_path / "tasks", str(data), s, "test") for s in ("easy", "challenge")]
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4),
                                  tasks=names, task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                                        include_defaults=False),
                                  num_fewshot=k, log_samples=True, bootstrap_iters=0)
    model, tok = load_model(str(folder))
    ours = evaluate_arc(model, tok, str(data), subsets=["easy", "challenge"], num_fewshot=k, progress=False)
    theirs = [s for n in names for s in sorted(out["samples"][n], key=lambda s: s["doc_id"])]
    questions = [q for s in ("easy", "challenge") for q in load_subset(str(data), s, "test")]
    assert len(theirs) == len(ours["records"]) == 10
    for sample, record, q in zip(theirs, ours["records"], questions):
        assert [a[1] for a in sample["arguments"]] == [" " + c for c in q.choices]
        assert sample["arguments"][0][0].endswith(f"Question: {q.question}\nAnswer:")
        assert sample["arguments"][0][0].count("Question: ") == k + 1
        assert record["lls"] == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-4)
        assert (record["acc"], record["acc_norm"]) == (sample["acc"], sample["acc_norm"])
    if k:  # the seeded draw picks the same examples as lm-eval's sampler
        items = arc_items("easy", load_subset(str(data), "easy", "test"), load_subset(str(data), "easy", "train"), k)
        assert [i.context for i in items] == [s["arguments"][0][0] for s in theirs[:5]]


def test_cli_and_split_errors(tmp_path, capsys):
    data = write_arc(tmp_path / "arc")
    with pytest.raises(LlmlabError, match="the splits there are test, train: pick one with --split"):
        load_subset(str(data), "easy", "validation")
    code = main(["eval", "arc", "--model", "tiny-llama", "--data", str(data), "--split", "test", "--subsets", "easy",
                 "--limit", "3", "--out", str(tmp_path / "run"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 3 and list(summary["subsets"]) == ["ARC-Easy"] and "acc_norm" in summary
    assert main(["eval", "arc", "--subsets", "hard"]) == 2
    assert "unknown ARC subset 'hard'" in capsys.readouterr().err

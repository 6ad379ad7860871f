"""MMLU, CMMLU, C-Eval: prompts and scores equal lm-eval's (HFLM on the same tiny model), averages, bad files, CLI."""

import json

import pytest

from llmlab.cli import main
from llmlab.errors import LlmlabError
from llmlab.evaluate.mmlu import Row, evaluate_exam, load_subject, question_text, read_csv, subject_items, summarize
from llmlab.evaluate.multiple_choice import _groups, encode_items
from llmlab.models import load_model, save_model
from llmlab.stages.evaluate import MMLUConfig
from tests.conftest import SHARED_DATA

LAYOUT = {"mmlu": ("{split}/{subject}_{split}.csv", None),
          "cmmlu": ("{split}/{subject}.csv", ",Question,A,B,C,D,Answer"),
          "ceval": ("{split}/{subject}_{split}.csv", "id,question,A,B,C,D,answer")}


def write_exam(root, exam, subjects, splits=("dev", "val"), n=6):
    """Short made-up questions in the exam's file layout (5-shot prompts stay under tiny-llama's 512 bytes)."""
    pattern, header = LAYOUT[exam]
    for subject in subjects:
        for split in splits:
            path = root / pattern.format(split=split, subject=subject)
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = [header] if header else []
            for i in range(5 if split == "dev" else n):
                cells = [f'"{split} {i}: {subject[:3]}, x?"', f"a{i}", "b", f'"c,{i}"', "d", "ABCD"[(i * 7) % 4]]
                lines.append(",".join(([str(i)] if header else []) + cells))
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    save_model(*load_model("tiny-llama"), folder)
    return folder


def lm_eval_samples(folder, tmp_path, exam, data, subject, split, k, limit=None):
    """lm-eval's own task for one subject, on local copies of the files, run by HFLM on the model folder."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmlab.evaluate.lm_eval_adapter import exam_task

    name = exam_task(tmp_path / "tasks", exam, str(data), subject, split)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4),
                                  tasks=[name], task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                                         include_defaults=False),
                                  num_fewshot=k, limit=limit, log_samples=True, bootstrap_iters=0)
    return sorted(out["samples"][name], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("exam, subject, split, k", [("mmlu", "anatomy", "val", 5), ("ceval", "marxism", "val", 2),
                                                    ("cmmlu", "arts", "dev", 4)])
def test_prompts_and_scores_equal_lm_evals(tiny_folder, tmp_path, exam, subject, split, k):
    """Same context strings, per-choice log-likelihoods within 1e-4 and the same choices as lm-eval's HFLM.

    cmmlu is scored on dev itself: each question is left out of its own examples, as lm-eval does.
    """
    data = write_exam(tmp_path / exam, exam, [subject])
    theirs = lm_eval_samples(tiny_folder, tmp_path, exam, data, subject, split, k)
    model, tok = load_model(str(tiny_folder))
    ours = evaluate_exam(model, tok, exam, str(data), split=split, subjects=[subject], num_fewshot=k, progress=False)
    rows, shots = load_subject(exam, str(data), subject, split), load_subject(exam, str(data), subject, "dev")
    items = subject_items(exam, subject, rows, shots, k, same_split=split == "dev")
    assert len(theirs) == len(ours["records"]) == len(rows)
    if split != "dev":  # the examples are one shared prefix, run once and reused from its KV cache
        assert max(p for p, _ in _groups(encode_items(tok, items), "packed")) > 100
    for sample, record, item in zip(theirs, ours["records"], items):
        assert [tuple(a) for a in sample["arguments"]] == [(item.context, " " + c) for c in item.choices]
        assert record["lls"] == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-4)
        assert record["acc"] == sample["acc"]


def test_question_text_and_description():
    row = Row("  What is 2+2? ", ["3", "4", "5", "6"], "B")
    assert question_text("mmlu", row) == "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    assert question_text("ceval", row).endswith("\nD. 6\n答案：")
    item = subject_items("mmlu", "high_school_us_history", [row], [row] * 5, 1)[0]
    assert item.context.startswith("The following are multiple choice questions (with answers) about high school "
                                   "us history.\n\nWhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\nWhat is 2+2?")
    assert (item.choices, item.gold, item.delimiter) == (["A", "B", "C", "D"], 1, " ")
    cmmlu = subject_items("cmmlu", "arts", [row], [], 0)[0]
    assert cmmlu.context.startswith("以下是关于艺术学的单项选择题，请直接给出正确答案的选项。\n\n"
                                    "What is 2+2?")


def test_categories_are_averaged_over_questions():
    def rec(subject, acc):
        return {"subject": subject, "acc": acc, "acc_norm": acc}

    records = [rec("anatomy", 1.0), rec("anatomy", 0.0), rec("astronomy", 1.0), rec("virology", 0.0)]
    s = summarize("mmlu", records)  # anatomy, astronomy: stem; virology: other
    assert s["categories"] == {"stem": {"acc": 2 / 3, "acc_norm": 2 / 3, "n": 3},
                               "other": {"acc": 0.0, "acc_norm": 0.0, "n": 1}}
    assert (s["acc"], s["subject_mean"], s["n"]) == (0.5, 0.5, 4)
    s = summarize("cmmlu", [rec("ancient_chinese", 1.0), rec("arts", 0.0)])  # a subject in two categories
    assert s["categories"]["Social Science"]["acc"] == 1.0 and s["categories"]["China specific"]["n"] == 1
    assert s["categories"]["Humanities"] == {"acc": 0.0, "acc_norm": 0.0, "n": 1}


@pytest.mark.parametrize("text, header, message", [
    ("id,question,A,B,C,D\n0,q,a,b,c,d\n", True, r"x.csv row 1: the header lacks answer"),
    (",Question,A,C,D,Answer\n0,q,a,c,d,A\n", True, r"x.csv row 1: the header lacks B"),
    ("q,a,b,c,d,A\nq2,a,b,c,d,E\n", False, r"x.csv row 2: the answer 'E' is not one of A, B, C, D"),
    ("q,a,b,c,d,A\nq2,a,b,c\n", False, r"x.csv row 2: 4 columns"),
    ("id,question,A,B,C,D,answer\n", True, r"x.csv holds no questions"),
    ("", False, r"x.csv is empty"),
])
def test_malformed_files_name_the_file_and_row(tmp_path, text, header, message):
    (tmp_path / "x.csv").write_text(text, encoding="utf-8")
    with pytest.raises(LlmlabError, match=message):
        read_csv(tmp_path / "x.csv", header)


def test_missing_split_subject_and_examples_are_clear_errors(tmp_path):
    data = write_exam(tmp_path / "mmlu", "mmlu", ["anatomy"])
    with pytest.raises(LlmlabError, match=r"has the splits dev, val: pick one with --split"):
        load_subject("mmlu", str(data), "anatomy", "test")
    with pytest.raises(LlmlabError, match="unknown mmlu subject 'anatomie' \\(did you mean 'anatomy'"):
        MMLUConfig(subjects=["anatomie"])
    with pytest.raises(LlmlabError, match=r"6-shot needs 6 solved examples but the few-shot split has 5"):
        evaluate_exam(None, None, "mmlu", str(data), split="val", subjects=["anatomy"], num_fewshot=6)
    with pytest.raises(LlmlabError, match="--split must be one of dev, test"):
        from llmlab.stages.evaluate import CMMLUConfig
        CMMLUConfig(split="val")


def test_shared_data_reads_and_cmmlu_needs_four_shots_on_dev():
    rows = read_csv(SHARED_DATA / "ceval" / "val" / "accountant_val.csv", header=True)
    assert len(rows) == 49 and rows[0].answer == "D" and rows[0].question.endswith("____。")
    assert len(load_subject("mmlu", str(SHARED_DATA / "mmlu"), "anatomy", "val")) == 14
    shots = load_subject("cmmlu", str(SHARED_DATA / "cmmlu"), "arts", "dev")
    with pytest.raises(LlmlabError, match="besides the question asked; use --num-fewshot 4"):
        subject_items("cmmlu", "arts", shots, shots, 5, same_split=True)


def test_cli_writes_summary_and_predictions(tmp_path, capsys):
    data = write_exam(tmp_path / "mmlu", "mmlu", ["anatomy", "virology"])
    code = main(["eval", "mmlu", "--model", "tiny-llama", "--data", str(data), "--split", "val",
                 "--subjects", "anatomy,virology", "--limit", "3", "--out", str(tmp_path / "run"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 6 and set(summary["subjects"]) == {"anatomy", "virology"}
    assert set(summary["categories"]) == {"stem", "other"} and 0 <= summary["acc"] <= 1
    predictions = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 6 and len(json.loads(predictions[0])["lls"]) == 4


@pytest.mark.slow
def test_builtin_model_matches_lm_eval_on_real_mmlu(tmp_path):
    """smollm2-135m on real MMLU val questions, 5-shot: the same answers as lm-eval's HFLM, lls within 1e-3."""
    folder = tmp_path / "smollm2"
    model, tok = load_model("smollm2-135m")
    save_model(model, tok, folder)
    theirs = lm_eval_samples(folder, tmp_path, "mmlu", SHARED_DATA / "mmlu", "astronomy", "val", 5, limit=4)
    ours = evaluate_exam(model, tok, "mmlu", str(SHARED_DATA / "mmlu"), split="val", subjects=["astronomy"],
                         limit=4, progress=False)
    for sample, record in zip(theirs, ours["records"]):
        assert record["lls"] == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-3)
        assert record["acc"] == sample["acc"]


def test_a_field_holding_unicode_line_breaks_stays_one_row(tmp_path):
    # the official MMLU test split has a U+2028 inside a question; form feeds and U+0085 occur in real data too
    text = 'What is x?\u2028(two lines)\x0c,1,2,"3\u0085",4,A\r\nSecond?,a,b,c,d,B\r\n'
    path = tmp_path / "algebra_test.csv"
    path.write_text(text, encoding="utf-8", newline="")
    rows = read_csv(path, header=False)
    assert [r.question for r in rows] == ["What is x?\u2028(two lines)\x0c", "Second?"]
    assert rows[0].options[2] == "3\u0085" and rows[1].answer == "B"

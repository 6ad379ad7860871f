import json

import pytest

from llmlab import cli
from llmlab.distill.distill import text_windows
from llmlab.errors import LlmlabError
from llmlab.models import load_model, save_model
from llmlab.models.tiny import byte_tokenizer
from llmlab.stages.distill import DistillConfig
from tests.distill.helpers import TEXT

ROW = ("llmlab.distill.distill", "distill_verb", "DistillConfig", [], "knowledge distillation")


@pytest.fixture(autouse=True)
def _verb(monkeypatch):
    """The lead adds the row to cli.STAGES; until then the tests add it themselves."""
    monkeypatch.setitem(cli.STAGES, "distill", cli.STAGES.get("distill", ROW))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT * 5, encoding="utf-8")
    return path


def run(capsys, *args) -> tuple[int, dict | None, str]:
    code = cli.main(["distill", "--teacher", "tiny-llama", *args, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]) if code == 0 else None, err


@pytest.mark.parametrize("method", ["ce", "kd", "gkd", "minillm", "seqkd"])
def test_cli_trains_saves_and_scores_a_student(capsys, tmp_path, text, method):
    rollout = ["--options.max_new_tokens", "4", "--options.prompt_len", "8"] if method in ("gkd", "minillm", "seqkd") else []
    code, summary, err = run(capsys, "--data", str(text), "--method", method, "--max-len", "32", "--student.layers", "1",
                             *rollout, "--train.max-steps", "2", "--train.batch-size", "2", "--eval-text", str(text),
                             "--eval-seq-len", "64", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert summary["steps"] == 2 and summary["method"] == method
    assert summary["student_params"] < summary["teacher_params"] and summary["student_ppl"] > 1
    student, _ = load_model(str(tmp_path / "run"))
    assert student.config.num_hidden_layers == 1


def test_cli_cot_on_gsm8k_rows(capsys, tmp_path):
    rows = tmp_path / "gsm.jsonl"
    rows.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5.\n#### 5"}) + "\n", encoding="utf-8")
    code, summary, err = run(capsys, "--data", str(rows), "--method", "cot", "--options.source", "data",
                             "--train.max-steps", "1", "--save", "false")
    assert code == 0, err
    assert summary["rationales"] == 1 and summary["examples"] == 2 and summary["saved"] is None


def test_tokenizer_mismatch_is_a_one_line_error(capsys, tmp_path, text):
    model, _ = load_model("tiny-llama")
    other = byte_tokenizer()
    other.add_tokens(["<extra>"])
    save_model(model, other, tmp_path / "student")
    capsys.readouterr()  # the save's progress bar
    code, _, err = run(capsys, "--data", str(text), "--student.source", str(tmp_path / "student"))
    assert code == 2
    last = err.strip().split("\n")[-1].split("\r")[-1]  # after transformers' loading bar
    assert last.startswith("llmlab: error: teacher and student tokenizers differ") and "Traceback" not in err


def test_bad_options_fail_before_loading():
    with pytest.raises(LlmlabError, match="did you mean 'minillm'"):
        DistillConfig(method="minilm")
    with pytest.raises(LlmlabError, match="options.beta"):
        DistillConfig(method="gkd", options={"beta": 2})
    with pytest.raises(LlmlabError, match="unknown key 'options.temprature'"):
        DistillConfig(method="kd", options={"temprature": 2})


def test_text_shorter_than_a_window():
    _, tok = load_model("tiny-llama")
    assert len(text_windows("abcdefgh" * 4, tok, 8)) == 4
    with pytest.raises(LlmlabError, match="fewer than one window"):
        text_windows("short", tok, 64)


@pytest.mark.slow
def test_builtin_teacher_with_half_its_layers(builtin_model):
    import copy

    import torch

    from llmlab.distill.distill import DistillTrainConfig, distill_model
    from llmlab.distill.student import StudentConfig, check_tokenizers, make_student

    teacher, tok = copy.deepcopy(builtin_model[0]), builtin_model[1]
    student, _ = make_student(StudentConfig(), teacher, tok)
    assert student.config.num_hidden_layers == 15
    with pytest.raises(LlmlabError, match="tokenizers differ"):
        check_tokenizers(tok, byte_tokenizer())
    examples = text_windows(TEXT * 4, tok, 64, 4)
    result = distill_model(teacher, student, tok, examples, "kd", {}, DistillTrainConfig(max_steps=2, batch_size=2,
                           bf16=True), progress=False)
    assert torch.isfinite(torch.tensor(result["train_loss"]))

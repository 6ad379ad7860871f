"""Exact match: normalisation, scoring against known replies, the real decoding loop on tiny-llama, the CLI."""

import json

import pytest

import llmlab.evaluate.exact_match as em
from llmlab.cli import main
from llmlab.errors import LlmlabError
from llmlab.evaluate.exact_match import contains, exact_match, is_correct, normalise, read_rows
from llmlab.generation.generate import SamplingConfig, generate

ROWS = [{"instruction": "What is 47 + 385?", "input": "", "output": "432", "kind": "add"},
        {"instruction": "Write this word in capital letters.", "input": "plant", "output": "PLANT", "kind": "upper"},
        {"instruction": "Convert 7 km to m.", "input": "", "output": "7000", "kind": "units"},
        {"instruction": "Reverse the letters of this word.", "input": "plant", "output": "tnalp", "kind": "upper"}]


@pytest.mark.parametrize("reply, answer, right", [
    (" 432\n", "432", True), ("432.", "432", True), ('"tnalp"', "tnalp", True), ("7,000", "7000", True),
    ("'PLANT'.", "PLANT", True), ("Plant", "PLANT", False), ("4320", "432", False),
    ("The answer is 432.", "432", False), ("1,2345", "12345", False), ("", "432", False)])
def test_normalised_comparison(reply, answer, right):
    assert is_correct(reply, answer) is right


def test_normalise_and_contains():
    assert normalise("  \"1,234,567\".  ") == "1234567"
    assert contains("The sum is 1,361.", "1361") and contains("It is PLANT", "PLANT")
    assert not contains("13610", "1361") and not contains("planted", "plant") and not contains("x", "")


def test_scores_and_per_kind_counts_from_known_replies(monkeypatch):
    seen = {}

    def fake_generate(model, tok, prompts, cfg, *, chat, batch_size):
        seen.setdefault("prompts", []).extend(prompts)
        seen.update(chat=chat, cfg=cfg, batch_size=batch_size)
        replies = {"What is 47 + 385?": "432.", "Convert 7 km to m.": "It is 7000 m."}
        return [replies.get(p, "PLANT") for p in prompts]

    monkeypatch.setattr(em, "generate", fake_generate)
    result = exact_match(None, None, ROWS, batch_size=3, max_new_tokens=7, progress=False)
    assert seen["prompts"] == ["What is 47 + 385?", "Write this word in capital letters.\n\nplant",
                               "Convert 7 km to m.", "Reverse the letters of this word.\n\nplant"]
    assert seen["chat"] is True and seen["cfg"].max_new_tokens == 7 and seen["cfg"].temperature == 0
    assert (result["correct"], result["total"], result["accuracy"]) == (2, 4, 0.5)
    assert result["contains_accuracy"] == 0.75  # "It is 7000 m." holds the answer, but is no exact match
    assert result["by_kind"] == {
        "add": {"accuracy": 1.0, "correct": 1, "total": 1, "contains_accuracy": 1.0},
        "units": {"accuracy": 0.0, "correct": 0, "total": 1, "contains_accuracy": 1.0},
        "upper": {"accuracy": 0.5, "correct": 1, "total": 2, "contains_accuracy": 0.5}}
    assert [e["prediction"] for e in result["examples"]] == ["432.", "PLANT", "It is 7000 m.", "PLANT"]


def test_real_decoding_matches_generate_and_counts_right(tiny_llama):
    """Rows whose outputs are the model's own greedy replies score 1; changing two of them scores 0.5."""
    model, tok = tiny_llama
    cfg = SamplingConfig(max_new_tokens=5)
    replies = [generate(model, tok, em.alpaca_message(r), cfg, chat=True) for r in ROWS]
    rows = [{**r, "output": reply} for r, reply in zip(ROWS, replies)]
    for row in rows[:2]:
        row["output"] += "x"
    result = exact_match(model, tok, rows, max_new_tokens=5, batch_size=3, progress=False)
    assert [e["prediction"] for e in result["examples"]] == replies  # batching and padding change nothing
    assert (result["correct"], result["total"]) == (2, 4)


def test_read_rows_checks_each_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert read_rows(path) == ROWS and read_rows(path, limit=2) == ROWS[:2]
    path.write_text(json.dumps({"instruction": "hi"}) + "\n")
    with pytest.raises(LlmlabError, match="rows.jsonl:1: each row must be an object with string 'instruction'"):
        read_rows(path)
    path.write_text("{not json\n")
    with pytest.raises(LlmlabError, match="rows.jsonl:1: not valid JSON"):
        read_rows(path)


def test_cli_smoke_run_on_tasks_from_the_cli(tmp_path, capsys):
    assert main(["data", "tasks", "--kinds", "add,reverse", "--train-per-kind", "2", "--heldout-per-kind", "3",
                 "--out", str(tmp_path / "tasks")]) == 0
    assert main(["eval", "em", "--model", "tiny-llama", "--data", str(tmp_path / "tasks" / "heldout.jsonl"),
                 "--max-new-tokens", "3", "--limit", "5", "--out", str(tmp_path / "em"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    predictions = [json.loads(x) for x in (tmp_path / "em" / "predictions.jsonl").read_text().splitlines()]
    assert summary["total"] == len(predictions) == 5 and summary["adapter"] is None
    assert summary["correct"] == sum(p["correct"] for p in predictions)
    assert set(summary["by_kind"]) <= {"add", "reverse"}
    assert json.loads((tmp_path / "em" / "summary.json").read_text())["accuracy"] == summary["accuracy"]


def test_cli_loads_an_adapter(tmp_path, capsys):
    """A LoRA with non-zero B changes the replies; the CLI's are those of the model with the adapter."""
    peft = pytest.importorskip("llmlab.peft")
    import torch

    from llmlab.models import load_model

    model, tok = load_model("tiny-llama")
    peft.apply_lora(model, peft.LoraConfig(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("B.weight"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    peft.save_adapter(model, tmp_path / "adapter")
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    assert main(["eval", "em", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--data", str(data),
                 "--max-new-tokens", "4", "--out", str(tmp_path / "em")]) == 0
    got = [json.loads(x)["prediction"] for x in (tmp_path / "em" / "predictions.jsonl").read_text().splitlines()]
    expected = exact_match(model, tok, ROWS, max_new_tokens=4, progress=False)["examples"]
    assert got == [e["prediction"] for e in expected]
    base, _ = load_model("tiny-llama")
    assert got != [e["prediction"] for e in exact_match(base, tok, ROWS, max_new_tokens=4, progress=False)["examples"]]


@pytest.mark.slow
def test_builtin_model_mostly_fails_the_tasks_before_training(builtin_model):
    """The point of `llmlab data tasks`: the untrained 135M model gets the held-out answers wrong."""
    from llmlab.data.tasks import make_tasks

    model, tok = builtin_model
    rows = make_tasks(["all"], 6, seed=0, split="heldout")
    result = exact_match(model, tok, rows, progress=False)
    assert result["total"] == 54 and result["accuracy"] < 0.15

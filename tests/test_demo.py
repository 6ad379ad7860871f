"""The README's main job, end to end on the built-in model."""

import json

import pytest

from llmlab.cli import main

pytestmark = pytest.mark.slow


def test_demo_answers_and_reports_perplexity(capsys, tmp_path):
    assert main(["demo", "--max-new-tokens", "24", "--out", "demo", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    answers = [json.loads(line) for line in (tmp_path / "demo" / "answers.jsonl").read_text().splitlines()]
    assert answers[0]["prompt"] == "What is the capital of France?" and "Paris" in answers[0]["output"]
    assert answers[0]["output"] in out  # streamed to the terminal
    assert 5 < summary["ppl"] < 200 and summary["generation_tokens_per_s"] > 0
    assert main(["runs", "show", "demo"]) == 0


def test_generate_cli_on_the_builtin_model(capsys):
    assert main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "16", "--json"]) == 0
    assert "Paris" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output"]

"""GSM8K CoT: prompt, answer extraction and exact match equal lm-eval's gsm8k_cot on the same replies; files; CLI."""

import json

import pytest

import llmlab.evaluate.gsm8k as g
from llmlab.cli import main
from llmlab.errors import LlmlabError
from llmlab.evaluate.gsm8k import evaluate_gsm8k, extract, is_correct, load_gsm8k, prompt, read_gsm8k
from tests.conftest import SHARED_DATA

ROWS = [{"question": f"Question {i}: how many?", "answer": f"Work {i}.\n#### {a}"}
        for i, a in enumerate(["72", "1,000", "18", "5", "-3", "0.5", "7"])]
REPLIES = [" She sold 48 + 24 = 72. The answer is 72.\n\n", " So 1000 in all. The answer is 1,000.",
           " It costs $18", " No idea.", " The answer is -3. Then 12 more.", " The answer is .5.", " 7 7 7 8"]


def test_extraction_and_match_follow_lm_evals_filters():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    strict = RegexFilter(regex_pattern=r"The answer is (\-?[0-9\.\,]+).")
    flexible = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    for reply, row in zip(REPLIES, ROWS):
        for how, oracle in (("strict", strict), ("flexible", flexible)):
            theirs = list(oracle.apply([[reply]], [row]))[0][0]
            assert extract(reply, how) == theirs
            match = exact_match_hf_evaluate([theirs], [g.reference(row["answer"])], ignore_case=True,
                                            regexes_to_ignore=g.IGNORE)["exact_match"]
            assert is_correct(theirs, row["answer"]) == bool(match)
    # the pattern's last "." is any character, so "-3." keeps its point; the match strips it later
    assert [extract(r) for r in REPLIES] == ["72", "1,000", "[invalid]", "[invalid]", "-3.", ".5", "[invalid]"]
    assert [extract(r, "flexible") for r in REPLIES] == ["72.", "1,000.", "$18", "[invalid]", "12", ".5.", "8"]
    assert [is_correct(extract(r), row["answer"]) for r, row in zip(REPLIES, ROWS)] == [True, True] + [False] * 2 + [
        True, False, False]


def test_prompt_and_scores_equal_lm_evals(tmp_path, monkeypatch):
    """lm-eval's own gsm8k_cot task, given the same replies, asks the same prompts and scores the same."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from llmlab.evaluate.lm_eval_adapter import gsm8k_task

    canned = {r["question"]: reply for r, reply in zip(ROWS, REPLIES)}
    seen = []

    class Canned(LM):
        def generate_until(self, requests, disable_tqdm=False):
            seen.extend(req.args for req in requests)
            return [canned[req.args[0].rsplit("Q: ", 1)[1].removesuffix("\nA:")] for req in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        loglikelihood_rolling = loglikelihood

    name = gsm8k_task(tmp_path / "tasks", ROWS)
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model=Canned(), tasks=[name], bootstrap_iters=0, task_manager=tasks)
    theirs = out["results"][name]

    def fake_generate(model, tok, prompts, cfg, *, chat, batch_size):
        assert cfg.stop == ["Q:", "</s>", "<|im_end|>"] and cfg.max_new_tokens == 256 and cfg.temperature == 0
        return [canned[p.rsplit("Q: ", 1)[1].removesuffix("\nA:")] for p in prompts]

    monkeypatch.setattr(g, "generate", fake_generate)
    ours = evaluate_gsm8k(None, None, ROWS, batch_size=3, progress=False)
    assert sorted(ctx for ctx, _ in seen) == sorted(prompt(r["question"]) for r in ROWS)
    assert ours["strict_match"] == theirs["exact_match,strict-match"] == 3 / 7
    assert ours["flexible_extract"] == theirs["exact_match,flexible-extract"] == 3 / 7
    assert [r["strict"] for r in ours["records"]][:2] == ["72", "1,000"]


def test_prompt_text():
    text = prompt("How many?", 2)
    assert text.startswith("Q: There are 15 trees in the grove.") and text.endswith("\n\nQ: How many?\nA:")
    assert text.count("The answer is") == 2 and prompt("How many?", 0) == "Q: How many?\nA:"
    with pytest.raises(LlmlabError, match="--num-fewshot must be 0 to 8"):
        prompt("x", 9)


def test_files(tmp_path):
    assert len(read_gsm8k(SHARED_DATA / "gsm8k" / "train.jsonl")) == 7473
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(LlmlabError, match=r"bad.jsonl:1: the answer has no '#### N' line"):
        read_gsm8k(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(LlmlabError, match=r"bad.jsonl:1: each row needs string 'question' and 'answer'"):
        read_gsm8k(tmp_path / "bad.jsonl")
    with pytest.raises(LlmlabError, match="test.jsonl not found; the splits there are train"):
        load_gsm8k(str(SHARED_DATA / "gsm8k"), "test")


def test_cli_runs_the_real_decoding_loop(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    code = main(["eval", "gsm8k", "--model", "tiny-llama", "--data", str(tmp_path / "q.jsonl"), "--num-fewshot", "1",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "run"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 2 and 0 <= summary["strict_match"] <= summary["n"]
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in records] == ["72", "1,000"] and all(isinstance(r["reply"], str) for r in records)

from llmlab.data.pipeline import make_step
from llmlab.data.steps.base import StepLog
from llmlab.data.steps.exact_dedup import exact_duplicates, normalize, words


def test_normalize():
    assert normalize("  Ｈｅｌｌｏ,\n\tWORLD!  ") == "hello, world!"          # NFKC folds full-width forms
    assert normalize("Hello, world!", strip_punctuation=True) == "hello world"
    assert normalize("ﬁne “quotes”。", strip_punctuation=True) == "fine quotes"
    assert words("Hello, 我们的 test_x 3.14") == ["hello", "我", "们", "的", "test_x", "3", "14"]


def test_keep_first_of_equal_normalised_texts():
    texts = ["Hello world", "hello   WORLD", "Hello, world!", "Ｈｅｌｌｏ world", "other"]
    assert exact_duplicates(texts) == [None, 0, None, 0, None]
    assert exact_duplicates(texts, strip_punctuation=True) == [None, 0, 0, 0, None]


def test_step():
    docs = [{"id": str(i), "text": t} for i, t in enumerate(["A b", "a  B", "c", "A b"])]
    log = StepLog("exact_dedup")
    out = list(make_step("exact_dedup").process(iter(docs), log))
    assert [d["id"] for d in out] == ["0", "2"]
    assert log.drops == {"exact_duplicate": 2} and log.drop_bytes["exact_duplicate"] == 7


def test_dedup_steps_run_in_a_pipeline(tmp_path):
    """All de-duplication steps chained in one `llmlab data run` pipeline, with the summary of what each removed."""
    import json
    import random

    from llmlab.config import build
    from llmlab.data.pipeline import PipelineConfig, run_pipeline
    from llmlab.runs import RunOptions

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choice(vocab) for _ in range(80)) + "." for _ in range(30)]
    question = "Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May"
    rows = texts + [texts[0].upper(), texts[1] + " extra words here", "Homework: " + question]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": question}) + "\n")
    cfg = build(PipelineConfig, {
        "input": {"path": str(tmp_path / "in.jsonl")}, "progress": False,
        "steps": ["exact_dedup", {"minhash_dedup": {"threshold": 0.8}}, "sentence_dedup",
                  {"substring_dedup": {"min_len": 50}},
                  {"decontaminate": {"benchmarks": [{"name": "gsm8k", "path": str(tmp_path / "gsm.jsonl")}]}}]})
    summary = run_pipeline(cfg, RunOptions(out=str(tmp_path / "run")))
    drops = {s["step"]: s["drops"] for s in summary["steps"]}
    assert drops["exact_dedup"] == {"exact_duplicate": 1}
    assert drops["minhash_dedup"] == {"near_duplicate": 1}
    assert drops["decontaminate"] == {"contaminated_gsm8k": 1}
    assert summary["docs_out"] == 30
    assert (tmp_path / "run" / "dropped" / "minhash_dedup" / "near_duplicate.jsonl").is_file()

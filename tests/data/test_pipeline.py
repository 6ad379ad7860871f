"""The pipeline runner: phases, workers, resume, bad input, formats and the CLI."""
import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from llmlab import methods
from llmlab.config import build
from llmlab.data import pipeline, readers
from llmlab.data.pipeline import PipelineConfig, run_pipeline
from llmlab.data.steps.base import Step, StepLog, register
from llmlab.errors import LlmlabError
from llmlab.runs import RunOptions

EN = ("Report {i}: The town council met on Monday and agreed to repair the old bridge near the market. "
      "Residents have asked for the work for years, and the mayor said that it will start in spring. "
      "The cost will be shared with the county, which owns the road on the far side of the river.")
ZH = "第{i}号通知：市政府决定在明年春天修复老城区的石桥。居民们多年来一直希望改善这条道路，市长表示工程将由市县两级共同出资。"
DE = "Bericht {i}: Der Stadtrat hat am Montag beschlossen, die alte Brücke am Markt im nächsten Frühjahr zu reparieren."
STEPS = [{"language": {"languages": ["en", "zh"], "threshold": 0.5}}, {"gopher_quality": {"min_words": 20}},
         "exact_dedup", "redact_pii"]


def write_corpus(path: Path) -> Path:
    """30 documents (18 unique, English or Chinese, long enough) and 2 invalid rows."""
    rows = [{"text": EN.format(i=i) + (f" Write to clerk{i}@town.gov." if i < 5 else "")} for i in range(12)]
    rows += [{"text": ZH.format(i=i)} for i in range(6)] + [{"text": DE.format(i=i)} for i in range(3)]
    rows += [{"text": "Thank you"}] * 3 + [{"text": EN.format(i=0) + " Write to clerk0@town.gov."}] * 2
    rows += [{"text": EN.format(i=1) + " Write to clerk1@town.gov."}] * 2
    rows += [{"text": "The bridge will open soon and the council is happy with it."}] * 2
    lines = [json.dumps(dict(r, id=f"d{k}"), ensure_ascii=False).encode() for k, r in enumerate(rows)]
    lines.insert(7, b'{"id": "bad", "text": "caf\xe9 latin-1 bytes"}')  # invalid UTF-8: counted, skipped
    lines.insert(20, b'{"id": "lone", "text": "half a pair \\ud800"}')  # a lone surrogate: no writer takes it
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def config(tmp_path, **kw) -> PipelineConfig:
    data = {"input": {"path": str(write_corpus(tmp_path / "raw.jsonl")), "shard_mb": 0.002},
            "output": {"shard_docs": 7}, "steps": STEPS, "progress": False, **kw}
    return build(PipelineConfig, data)


def run(cfg, out) -> dict:
    return run_pipeline(cfg, RunOptions(out=str(out)))


def output(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((folder / "data").iterdir()))


def test_steplog_counts_and_caps_samples():
    log = StepLog("s", keep=2)
    for i in range(3):
        log.drop({"id": str(i), "text": "ab"}, "short")
    log.modified({}, "EMAIL", 2)
    other = StepLog("s", keep=2)
    other.drop({"id": "x", "text": "é"}, "short")
    log.merge(other)
    assert log.drops == Counter(short=4) and log.drop_bytes == Counter(short=8) and log.changes == Counter(EMAIL=2)
    assert [d["id"] for d in log.samples["short"]] == ["0", "1"]
    assert StepLog.from_dict(log.to_dict()).to_dict() == log.to_dict()


def test_end_to_end_counts(tmp_path, capsys):
    summary = run(config(tmp_path), tmp_path / "out")
    steps = {s["step"]: s for s in summary["steps"]}
    assert (summary["docs_read"], summary["invalid_utf8"], summary["docs_out"]) == (30, 2, 18)
    assert steps["language"]["drops"] == {"language_not_allowed": 3, "language_low_score": 3}
    assert steps["gopher_quality"]["drops"] == {"gopher_min_words": 2}
    assert steps["exact_dedup"]["drops"] == {"exact_duplicate": 4}
    assert steps["redact_pii"]["changes"] == {"EMAIL": 5}
    for a, b in zip(summary["steps"], summary["steps"][1:]):  # what one step emits, the next receives
        assert (a["docs_out"], a["bytes_out"]) == (b["docs_in"], b["bytes_in"])
    assert summary["files"] == ["data/part-00000.jsonl", "data/part-00001.jsonl", "data/part-00002.jsonl"]
    out = tmp_path / "out"
    docs = [json.loads(line) for line in output(out).decode().splitlines()]
    assert len(docs) == 18 and all(d["language"] in ("en", "zh") for d in docs)
    assert sum("<EMAIL>" in d["text"] for d in docs) == 5 and not any("@town.gov" in d["text"] for d in docs)
    assert [json.loads(x)["id"] for x in (out / "dropped/language/language_not_allowed.jsonl").read_text().splitlines()] \
        == ["d18", "d19", "d20"]
    assert json.loads((out / "summary.json").read_text())["docs_out"] == 18
    assert not (out / "work").exists()  # removed after a finished run unless keep_work
    printed = capsys.readouterr().out
    assert "language_not_allowed=3" in printed and "18 of 30 documents kept" in printed


def test_two_workers_give_the_same_output(tmp_path):
    one = run(config(tmp_path), tmp_path / "one")
    two = run(config(tmp_path, workers=2), tmp_path / "two")
    assert output(tmp_path / "one") == output(tmp_path / "two")
    strip = lambda s: [{k: v for k, v in x.items() if k != "seconds"} for x in s["steps"]]  # noqa: E731
    assert strip(one) == strip(two)


def test_datatrove_executor_with_two_workers(tmp_path):
    pytest.importorskip("datatrove")
    steps = STEPS[1:2] + STEPS[3:]  # one map phase, no language model: each datatrove pool costs seconds to start
    run(config(tmp_path, steps=steps), tmp_path / "local")
    run(config(tmp_path, steps=steps, workers=2, executor="datatrove"), tmp_path / "dt")
    assert output(tmp_path / "local") == output(tmp_path / "dt")


@pytest.fixture
def failing_step(tmp_path):
    """A per-document step that records each document it sees and fails on 'd12' while a flag file exists."""
    seen, flag = tmp_path / "seen.txt", tmp_path / "fail.flag"

    @dataclasses.dataclass
    class FailConfig:
        pass

    @register
    class FailOnce(Step):
        name, Config = "_fail_once", FailConfig

        def process(self, docs, log):
            for doc in docs:
                with open(seen, "a") as f:
                    f.write(doc["id"] + "\n")
                if doc["id"] == "d12" and flag.exists():
                    raise RuntimeError("injected failure")
                yield doc

    flag.touch()
    yield seen, flag
    methods.TABLE["data"].pop("_fail_once")


def test_resume_skips_finished_shards(tmp_path, failing_step):
    seen, flag = failing_step
    cfg = config(tmp_path, steps=["_fail_once", *STEPS])
    shards = [[d["id"] for d in readers.read_shard(s, cfg.input, Counter())] for s in readers.plan_shards(cfg.input)]
    k = next(i for i, ids in enumerate(shards) if "d12" in ids)
    assert 0 < k < len(shards) - 1
    with pytest.raises(RuntimeError, match="injected"):
        run(cfg, tmp_path / "out")
    assert seen.read_text().split() == sum(shards[:k], []) + shards[k][:shards[k].index("d12") + 1]
    assert len(list((tmp_path / "out" / "work").glob("phase-0-*/shard-*.json"))) == k  # done markers
    assert not (tmp_path / "out" / "data").exists()  # nothing half-written
    flag.unlink()
    seen.unlink()
    summary = run(cfg, tmp_path / "out")
    assert seen.read_text().split() == sum(shards[k:], [])  # finished shards are not recomputed
    run(build(PipelineConfig, {**dataclasses.asdict(cfg), "steps": STEPS}), tmp_path / "clean")
    assert output(tmp_path / "out") == output(tmp_path / "clean")  # same as an uninterrupted run
    assert summary["docs_out"] == 18


def test_resume_skips_finished_phases_and_redoes_changed_ones(tmp_path):
    cfg = config(tmp_path, keep_work=True)
    run(cfg, tmp_path / "out")
    work = tmp_path / "out" / "work"
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*.json")}
    run(cfg, tmp_path / "out")
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.json")} == stamps  # nothing redone
    changed = build(PipelineConfig, {**dataclasses.asdict(cfg), "steps": STEPS[:3] + [{"redact_pii": {"types": ["IP"]}}]})
    summary = run(changed, tmp_path / "out")
    assert summary["steps"][-1]["changes"] == {}
    kept = [p for p in stamps if p.exists() and p.stat().st_mtime_ns == stamps[p]]
    assert kept and all("phase-0-" in str(p) or "phase-1-" in str(p) for p in kept)


def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, monkeypatch):
    raw = tmp_path / "raw.jsonl"
    cases = [(b'{"text": "fine"}\n{"body": "no text here"}\n', "raw.jsonl:2: row has no field 'text'"),
             (b'{"text": "fine"}\n{"text": \n', "raw.jsonl:2: not valid JSON"),
             (b'["a list"]\n', "must be a JSON object"),
             (b"", "empty"),
             (b'{"text": "\xff\xfe"}\n', "no documents to read \\(1 rows skipped as invalid UTF-8\\)")]
    for content, message in cases:
        raw.write_bytes(content)
        cfg = build(PipelineConfig, {"input": {"path": str(raw)}, "steps": ["redact_pii"], "progress": False})
        with pytest.raises(LlmlabError, match=message):
            run(cfg, tmp_path / "out")
        assert not (tmp_path / "out" / "data").exists()
    raw.write_bytes(b"".join(b'{"text": "row %d"}\n' % i for i in range(300)) + b'{"body": "late"}\n')
    cfg = build(PipelineConfig, {"input": {"path": str(raw), "shard_mb": 0.001}, "workers": 2, "progress": False})
    with pytest.raises(LlmlabError, match="raw.jsonl:301: row has no field 'text'"):  # raised in a worker
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "data").exists()
    with pytest.raises(LlmlabError, match="matches no files"):
        build(PipelineConfig, {"input": {"path": str(tmp_path / "*.parquet")}, "progress": False}) and \
            readers.find_inputs(str(tmp_path / "*.parquet"), "auto")
    with pytest.raises(LlmlabError, match="did you mean 'gopher_quality'"):
        build(PipelineConfig, {"input": {"path": str(raw)}, "steps": ["gopher_qualty"]})
    with pytest.raises(LlmlabError, match="did you mean 'steps\\[0\\].language.threshold'|did you mean 'threshold'"):
        build(PipelineConfig, {"input": {"path": str(raw)}, "steps": [{"language": {"treshold": 0.5}}]})
    raw.write_bytes(b'{"text": "fine"}\n')

    def refuse(path):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(readers, "_open", refuse)
    with pytest.raises(LlmlabError, match="cannot read input file .*raw.jsonl: Permission denied"):
        run(build(PipelineConfig, {"input": {"path": str(raw)}, "progress": False}), tmp_path / "out")


def test_byte_range_shards_read_every_row_once(tmp_path):
    path = write_corpus(tmp_path / "raw.jsonl")
    cfg = build(pipeline.InputConfig, {"path": str(path), "shard_mb": 0.001})
    shards = readers.plan_shards(cfg)
    assert len(shards) > 5 and shards[0]["start"] == 0 and shards[-1]["end"] == path.stat().st_size
    assert all(a["end"] == b["start"] for a, b in zip(shards, shards[1:]))
    stats = Counter()
    ids = [d["id"] for s in shards for d in readers.read_shard(s, cfg, stats)]
    assert ids == [f"d{k}" for k in range(30)] and stats["invalid_utf8"] == 2


def test_txt_parquet_and_hf_inputs(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "a.txt").write_text("First paragraph here.\nStill first.\n\nSecond one.\n\n\nThird.\n")
    cfg = build(PipelineConfig, {"input": {"path": str(tmp_path / "a.txt"), "txt_unit": "paragraph"},
                                 "output": {"format": "parquet"}, "progress": False})
    summary = run(cfg, tmp_path / "txt")
    assert summary["docs_out"] == 3 and summary["files"] == ["data/part-00000.parquet"]
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "txt" / "data" / "part-00000.parquet")
    assert table.column("text").to_pylist() == ["First paragraph here.\nStill first.", "Second one.", "Third."]
    cfg = build(PipelineConfig, {"input": {"path": str(tmp_path / "txt" / "data")}, "progress": False})
    assert run(cfg, tmp_path / "pq")["docs_out"] == 3
    datasets.Dataset.from_dict({"body": ["one doc", "two doc"], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    cfg = build(PipelineConfig, {"input": {"path": str(tmp_path / "ds"), "format": "hf", "text_key": "body"},
                                 "progress": False})
    assert run(cfg, tmp_path / "hf")["docs_out"] == 2
    rows = [json.loads(x) for x in output(tmp_path / "hf").decode().splitlines()]
    assert rows[1] == {"id": f"{tmp_path / 'ds'}:0:1", "text": "two doc", "n": 2}


def test_cli_data_run(tmp_path, capsys):
    from llmlab.cli import main

    write_corpus(tmp_path / "raw.jsonl")
    (tmp_path / "p.yaml").write_text(json.dumps({"input": {"path": str(tmp_path / "raw.jsonl")}, "steps": STEPS}))
    assert main(["data", "run", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "out"), "--progress", "false",
                 "--output.shard-docs", "100"]) == 0
    assert (tmp_path / "out" / "data" / "part-00000.jsonl").is_file()
    assert "18 of 30 documents kept" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text(json.dumps({"input": {"path": "x"}, "steps": ["minhash_dedupe"]}))
    assert main(["data", "run", str(tmp_path / "bad.yaml")]) == 2
    assert "did you mean 'minhash_dedup'" in capsys.readouterr().err


def test_example_pipeline_yaml_is_valid():
    from llmlab import config
    from tests.conftest import ROOT

    cfg = config.load(PipelineConfig, ROOT / "examples" / "pipeline.yaml", {"workers": "3"})
    assert cfg.workers == 3 and [next(iter(s)) for s in cfg.steps][:2] == ["language", "gopher_quality"]
    phases = pipeline.plan_phases(pipeline.parse_steps(cfg.steps))
    assert [p["global"] for p in phases] == [False, True, True, True, False]


def test_output_tokenizer_packs_the_kept_documents_for_training(tmp_path):
    from llmlab.data.sft import load_sft_data
    from llmlab.data.shards import TokenShards
    from llmlab.models.tiny import byte_tokenizer

    summary = run(config(tmp_path, output={"shard_docs": 7, "tokenizer": "tiny-llama", "shard_tokens": 500}),
                  tmp_path / "out")
    tokenizer = byte_tokenizer()
    kept = [json.loads(line)["text"] for p in sorted((tmp_path / "out" / "data").iterdir())
            for line in p.read_text(encoding="utf-8").splitlines()]
    stream = [t for text in kept for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    shards = TokenShards(tmp_path / "out" / "tokens", seq_len=99)
    assert summary["tokens"]["documents"] == len(kept) and summary["tokens"]["total_tokens"] == len(stream)
    assert shards.manifest["shards"][0]["tokens"] == 500 and shards[0].tolist() == stream[:100]
    data = load_sft_data(str(tmp_path / "out"), tokenizer, max_len=100, eval_fraction=0.25)
    assert data.stats["format"] == "tokens" and len(data.train) + len(data.eval) == len(shards)
    assert all(e["input_ids"] == e["labels"] and len(e["input_ids"]) == 100 for e in data.train)

"""Whole-pipeline throughput in MB/s per core, with 1 and 2 workers, and the PII detector's precision/recall.

    .venv/bin/python benchmarks/bench_pipeline.py [--mb 8] [--workers 1,2] [--quick]

Corpus (built in a temporary folder from ../shared/data, never copied into the repo): alpaca outputs,
WikiText-2 validation paragraphs and alpaca-zh outputs, interleaved, plus planted problems: 5 % exact copies,
3 % near-copies (one word in 80 substituted), 5 % of documents with an e-mail, phone number or card number
added. Each source is used without replacement until it runs out; WikiText (~1 MB) then repeats, so larger
corpora hold more exact duplicates than the planted 5 %.
The pipeline is every filter of issue 7 that works per document, and the global de-duplication steps:

    language → gopher_quality → gopher_repetition → c4_rules → blocklist → exact_dedup → minhash_dedup → redact_pii

MB/s is input bytes (UTF-8 text) over wall-clock seconds of the whole run (planning, reading, all phases,
writing). "per core" divides by the workers; "per CPU-s" divides by the CPU seconds this process and its
children used, which is the fairer figure on a machine whose cores are shared with other jobs. The per-step
table gives each step's own CPU seconds (summed over workers) and its MB per CPU-second on the bytes it received.
"""

import argparse
import json
import random
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmlab.config import build  # noqa: E402
from llmlab.data.pipeline import PipelineConfig, run_pipeline  # noqa: E402
from llmlab.data.steps.redact import evaluate  # noqa: E402
from llmlab.runs import RunOptions, format_table  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PII = ["Contact me at j.smith{i}@example.com.", "Call +1 (415) 555-{i:04d} any time.", "手机号码1381234{i:04d}。",
       "Card 4111 1111 1111 1111 was used."]
STEPS = [{"language": {"languages": ["en", "zh"], "threshold": 0.5}}, {"gopher_quality": {"min_words": 20}},
         "gopher_repetition", {"c4_rules": {"min_sentences": 1}}, "blocklist", "exact_dedup",
         {"minhash_dedup": {"threshold": 0.8}}, "redact_pii"]


def build_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """Write the benchmark corpus as JSON Lines; returns its size in bytes."""
    rng = random.Random(seed)
    en = [r["output"] for r in json.loads((DATA / "alpaca" / "alpaca_data.json").read_text("utf-8"))]
    zh = [r["output"] for p in sorted((DATA / "alpaca_zh").glob("*.json")) for r in json.loads(p.read_text("utf-8"))]
    wiki = [p.strip() for p in re.split(r"\n \n", (DATA / "wikitext2_raw" / "wiki.valid.raw").read_text("utf-8"))
            if len(p) > 300]
    pools = [en, wiki, zh]
    for pool in pools:
        rng.shuffle(pool)
    docs, size, budget = [], 0, mb * 2**20
    while size < budget:
        pool = pools[len(docs) % 3]
        text = pool[(len(docs) // 3) % len(pool)]  # without replacement until a pool runs out (wiki: ~1 MB)
        roll = rng.random()
        if roll < 0.05 and docs:
            text = docs[rng.randrange(len(docs))]  # exact copy
        elif roll < 0.08 and docs:
            words = docs[rng.randrange(len(docs))].split(" ")
            for _ in range(max(1, len(words) // 80)):
                words[rng.randrange(len(words))] = "changed"
            text = " ".join(words)  # near copy
        elif roll < 0.13:
            text += " " + rng.choice(PII).format(i=rng.randrange(10000))
        docs.append(text)
        size += len(text.encode("utf-8"))
    path.write_text("".join(json.dumps({"id": f"b{i}", "text": t}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(docs)), encoding="utf-8")
    return path.stat().st_size


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_once(corpus: Path, folder: Path, workers: int, shard_mb: float) -> dict:
    cfg = build(PipelineConfig, {"input": {"path": str(corpus), "shard_mb": shard_mb}, "steps": STEPS,
                                 "workers": workers, "progress": False, "output": {"shard_docs": 50000}})
    cpu, start = cpu_seconds(), time.perf_counter()
    summary = run_pipeline(cfg, RunOptions(out=str(folder / f"w{workers}"), registry=str(folder / "reg.sqlite")))
    summary["wall"], summary["cpu"] = time.perf_counter() - start, cpu_seconds() - cpu
    return summary


def step_table(summary: dict) -> str:
    rows = [[s["label"], s["docs_in"], s["docs_out"], f"{s['seconds']:.2f}",
             f"{s['bytes_in'] / 2**20 / max(s['seconds'], 1e-9):.2f}",
             ", ".join(f"{k}={v}" for k, v in sorted({**s["drops"], **s["changes"]}.items(), key=lambda x: -x[1])[:4])]
            for s in summary["steps"]]
    return format_table(["step", "docs in", "docs out", "CPU s (all workers)", "MB per CPU-s", "top drops / changes"], rows)


def pii_table() -> str:
    path = Path(__file__).resolve().parents[1] / "tests" / "data" / "pii_labelled.jsonl"
    rows = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    out = []
    for split in ("dev", "heldout"):
        for kind, r in evaluate([x for x in rows if x["split"] == split]).items():
            out.append([split, kind, r["tp"], r["fp"], r["fn"], f"{r['precision']:.3f}", f"{r['recall']:.3f}"])
    return format_table(["split", "type", "tp", "fp", "fn", "precision", "recall"], out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--quick", action="store_true", help="a 1 MB corpus")
    args = parser.parse_args()
    mb = 1.0 if args.quick else args.mb
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        size = build_corpus(corpus, mb)
        print(f"corpus: {size / 2**20:.2f} MB, {sum(1 for _ in corpus.open())} documents\n")
        results = []
        for workers in map(int, args.workers.split(",")):
            summary = run_once(corpus, Path(tmp), workers, shard_mb=max(size / 2**20 / 16, 0.05))
            mbs = summary["bytes_read"] / 2**20
            results.append([workers, f"{summary['wall']:.1f}", f"{mbs / summary['wall']:.2f}",
                            f"{mbs / summary['wall'] / workers:.2f}", f"{summary['cpu']:.1f}",
                            f"{mbs / summary['cpu']:.2f}", summary["docs_out"]])
            print(f"\n-- {workers} worker(s): per-step table\n{step_table(summary)}\n")
    print(format_table(["workers", "wall s", "MB/s", "MB/s per core", "CPU s", "MB per CPU-s", "docs out"], results))
    print(f"\nPII detector on tests/data/pii_labelled.jsonl (exact span and type match):\n{pii_table()}")


if __name__ == "__main__":
    main()

"""Every `llmlab …` command the README and docs/ show runs, in order, as written, on a tiny model with
tiny budgets: a documented command cannot break unnoticed.

Each command is read from the ```bash blocks, then only shrunk: the built-in model becomes tiny-llama
(the teacher, the tokenizer and every --model too), and the options that set how much work is done
(steps, windows, samples, lengths, question limits) get small values. The files the commands name
(prompts, rows, text, a raw corpus) are made in a scratch folder beside a link to ../shared/data.
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from llmlab.cli import STAGES, main
from tests.conftest import ROOT, SHARED_DATA

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# commands that cannot run here, and why
SKIP = {"eval harness": "lm-eval's tasks download their datasets from the hub (the harness verb is tested on a local task)"}
BUDGET = {  # option -> the value a documented command gets, where it takes the option
    "--train.max-steps": "2", "--train.batch-size": "2", "--max-len": "64", "--seq-len": "32", "--stride": "16",
    "--max-windows": "2", "--n-samples": "4", "--limit": "2", "--max-new-tokens": "4", "--vocab-size": "300",
    "--eval-seq-len": "64", "--eval-windows": "1", "--max-examples": "8", "--ppl-seq-len": "64", "--ppl-windows": "1",
    "--eval-samples": "2", "--gen-batch-size": "4", "--options.max-new-tokens": "4", "--num-fewshot": "1",
    "--shard-mb": "0.01", "--train.eval-every": "0", "--train.save-every": "1",
}
SHRINK_ONLY = {"--lorc-rank": "4", "--student.layers": "1"}  # features: made smaller where a command uses them


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every `llmlab` command in a ```bash block, `&&` chains split, comments dropped."""
    found = []
    for doc in DOCS:
        in_bash = False
        for number, line in enumerate(doc.read_text(encoding="utf-8").split("\n"), 1):
            if line.startswith("```"):
                in_bash = line.strip() == "```bash"
                continue
            if in_bash and line.startswith("llmlab "):
                for part in re.split(r"\s&&\s", line):
                    words = shlex.split(part, comments=True)
                    if words and words[0] == "llmlab":
                        found.append((f"{doc.name}:{number}", words[1:]))
    return found


def verb_of(argv: list[str]) -> str:
    return next(v for v in sorted(STAGES, key=len, reverse=True) if argv[:len(v.split())] == v.split())


def shrink(argv: list[str]) -> list[str]:
    """The command with the built-in model swapped for tiny-llama and the work made tiny."""
    verb = verb_of(argv)
    cls = getattr(__import__(STAGES[verb][0], fromlist=[STAGES[verb][2]]), STAGES[verb][2])
    from llmlab.config import describe

    options = {row[0] for row in describe(cls)}
    argv = [w.replace("smollm2-135m", "tiny-llama") for w in argv]
    for flag, model in (("--model", "tiny-llama"), ("--teacher", "tiny-llama")):
        # merge finds the adapter's own base; pretrain builds a model from scratch unless --model is written
        if flag in options and flag not in argv and verb not in ("merge", "pretrain"):
            argv += [flag, model]
    for option, value in {**BUDGET, **SHRINK_ONLY}.items():
        if option in argv:
            argv[argv.index(option) + 1] = value
        elif option in options and option in BUDGET:
            argv += [option, value]
    if verb == "arena" and "--judge" not in argv:
        argv += ["--judge", "tiny-llama"]
    return argv


def _scratch(root: Path):
    """The files the documented commands name, cut from a public-domain book (../shared/data/long_docs)."""
    book = (SHARED_DATA / "long_docs" / "pg11.txt").read_text(encoding="utf-8")
    paragraphs = [" ".join(p.split()) for p in book.split("\n\n") if len(p.split()) >= 40][:120]
    sentences = [s.strip() + "." for p in paragraphs for s in p.split(". ") if len(s.split()) > 4]
    words = sorted({w.strip(".,;:!?'\"()").lower() for w in " ".join(sentences).split()} - {""})[:40]
    text = "\n\n".join(paragraphs)
    for name in ("calib.txt", "eval.txt", "train.txt", "wiki.valid.raw"):
        (root / name).write_text(text, encoding="utf-8")
    (root / "questions.txt").write_text("What is a cat?\nWhere is the park?\n", encoding="utf-8")
    (root / "prompts.txt").write_text("Say hello.\nName a colour.\n", encoding="utf-8")
    rows = [{"instruction": f"Repeat: {w}", "input": "", "output": f"{w} {w}"} for w in words]
    pairs = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "?"} for w in words]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    short = [" ".join(s.split()[:4]) for s in sentences[:16]]
    chats = [{"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": s.upper()}]}
             for s in short]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": " ".join(sentences[i:i + 8])}) + "\n"
                                               for i in range(0, 160, 8)), encoding="utf-8")
    zh = json.loads((SHARED_DATA / "alpaca_zh" / "zh-data-part-00.json").read_text(encoding="utf-8"))[:300]
    (root / "zh.txt").write_text("\n".join(" ".join(r["output"].split()) for r in zh), encoding="utf-8")
    (root / "raw").mkdir()
    for part in range(2):
        docs = [{"id": f"{part}-{i}", "text": paragraphs[i]} for i in range(part, len(paragraphs), 2)]
        (root / "raw" / f"part{part}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (root / "examples").symlink_to(ROOT / "examples")
    (root.parent / "shared").mkdir(exist_ok=True)
    if not (root.parent / "shared" / "data").exists():
        (root.parent / "shared" / "data").symlink_to(SHARED_DATA)


def test_the_docs_show_commands_for_every_verb():
    verbs = {verb_of(argv) for _, argv in documented_commands()}
    assert verbs >= set(STAGES) - {"demo", "runs list", "runs show"}, set(STAGES) - verbs


@pytest.mark.slow
def test_every_documented_command_runs(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    _scratch(work)
    monkeypatch.chdir(work)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\n/exit\n"))  # for `llmlab chat`
    failures = []
    for where, argv in documented_commands():
        if verb_of(argv) in SKIP:
            continue
        command = shrink(argv)
        if verb_of(argv) == "chat":
            monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\n/exit\n"))
        code = main(command)
        err = capsys.readouterr().err
        if code != 0:
            failures.append(f"{where}: llmlab {' '.join(command)} -> exit {code}: {err.strip()[-300:]}")
    assert not failures, "\n".join(failures)

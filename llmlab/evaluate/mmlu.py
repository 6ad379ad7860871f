"""MMLU, CMMLU and C-Eval: k-shot multiple choice over many subjects, as lm-eval 0.4 asks them.

Hendrycks et al., "Measuring Massive Multitask Language Understanding", https://arxiv.org/abs/2009.03300
Li et al., "CMMLU: Measuring massive multitask language understanding in Chinese", https://arxiv.org/abs/2306.09212
Huang et al., "C-Eval: A Multi-Level Multi-Discipline Chinese Evaluation Suite", https://arxiv.org/abs/2305.08322

One question's prompt (lm-eval's task YAMLs, word for word; the Chinese exams end in "答案："):

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {dev question i}\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer: {its letter}\\n\\n        for the first k of dev
    {question}\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer:

scored over the continuations " A" … " D" (so acc_norm equals acc). When the questions come from
the few-shot split itself (CMMLU here has only dev), a question is left out of its own examples, as
lm-eval does. A category's and the overall accuracy are over questions, as lm-eval's groups weight
them (`weight_by_size`); `subject_mean` is the plain mean over subjects. Subjects, names and
categories live in exams.yaml.
"""

import csv
import io
import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from llmlab.data.text import read_text
from llmlab.errors import LlmlabError, closest
from llmlab.evaluate.multiple_choice import Item, accuracy, evaluate_items

LETTERS = ["A", "B", "C", "D"]
COLUMNS = ["question", "a", "b", "c", "d", "answer"]


@cache
def exams() -> dict:
    return yaml.safe_load(resources.files("llmlab.evaluate").joinpath("exams.yaml").read_text(encoding="utf-8"))


@dataclass
class Row:
    question: str
    options: list[str]
    answer: str  # A, B, C or D


# ---- reading the files ----

def read_csv(path: str | Path, header: bool) -> list[Row]:
    """Questions of one subject file; errors name the file and the CSV row (row 1 is the file's first)."""
    path = Path(path)
    records = list(csv.reader(io.StringIO(read_text(path), newline="")))  # the csv module finds the rows: a field
    # may hold line breaks of every kind (the official MMLU test split has a U+2028 inside a question)
    where = dict(zip(COLUMNS, range(6)))
    if header:
        names = [n.strip().lower() for n in records[0]]
        missing = [c.upper() if len(c) == 1 else c for c in COLUMNS if c not in names]
        if missing:
            raise LlmlabError(f"{path} row 1: the header lacks {', '.join(missing)}; expected the columns "
                              "question, A, B, C, D, answer (a split without answers cannot be scored)")
        where = {c: names.index(c) for c in COLUMNS}
    rows = []
    for number, record in enumerate(records[1:] if header else records, start=2 if header else 1):
        if not any(cell.strip() for cell in record):
            continue
        if len(record) <= max(where.values()):
            raise LlmlabError(f"{path} row {number}: {len(record)} columns, expected question, A, B, C, D, answer")
        answer = record[where["answer"]].strip()
        if answer not in LETTERS:
            raise LlmlabError(f"{path} row {number}: the answer '{answer}' is not one of A, B, C, D")
        rows.append(Row(record[where["question"]], [record[where[c]] for c in "abcd"], answer))
    if not rows:
        raise LlmlabError(f"{path} holds no questions; each subject file needs at least one row")
    return rows


def load_subject(exam: str, data: str, subject: str, split: str) -> list[Row]:
    """A subject's questions from a local folder in the exam's layout, or else from the hub id `data`."""
    spec = exams()[exam]
    folder = Path(data).expanduser()
    if folder.is_dir():
        path = folder / spec["files"].format(split=split, subject=subject)
        if not path.is_file():
            found = [s for s in spec["splits"] if (folder / s).is_dir()]
            hint = f"; {folder} has the splits {', '.join(found)}: pick one with --split" if split not in found else ""
            raise LlmlabError(f"{exam} file not found: {path}{hint}")
        return read_csv(path, spec["header"])
    if Path(data).suffix or data.startswith((".", "/", "~")):
        raise LlmlabError(f"data folder not found: {data}")
    return _hub_rows(data, subject, spec.get("hub_splits", {}).get(split, split))


def _hub_rows(hub_id: str, subject: str, split: str) -> list[Row]:
    from datasets import load_dataset

    try:
        table = load_dataset(hub_id, subject, split=split)
    except Exception as e:  # datasets raises many types for a missing id, split or network
        raise LlmlabError(f"could not load {hub_id} ({subject}, {split}) from the hub: "
                          f"{str(e).strip().splitlines()[0][:200]}; pass a local folder with --data") from None
    rows = []
    for r in table:
        r = {k.lower(): v for k, v in r.items()}
        options = list(r["choices"]) if "choices" in r else [r[c] for c in "abcd"]
        answer = LETTERS[r["answer"]] if isinstance(r["answer"], int) else str(r["answer"]).strip()
        rows.append(Row(r["question"], [str(o) for o in options], answer))
    return rows


# ---- prompts ----

def question_text(exam: str, row: Row) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, row.options))
    return f"{row.question.strip()}{options}\n{exams()[exam]['answer']}"


def subject_items(exam: str, subject: str, rows: list[Row], shots: list[Row], k: int,
                  same_split: bool = False) -> list[Item]:
    """The k-shot items of one subject: description, the first k shots (never the question itself)."""
    spec = exams()[exam]
    description = spec["description"].format(name=spec["subjects"][subject][0])
    items = []
    for i, row in enumerate(rows):
        pool = [s for j, s in enumerate(shots) if not (same_split and j == i)]
        if k > len(pool):
            raise LlmlabError(f"{exam} {subject}: {k}-shot needs {k} solved examples but the few-shot split has "
                              f"{len(pool)}{' besides the question asked' if same_split else ''}; "
                              f"use --num-fewshot {len(pool)}")
        examples = "".join(f"{question_text(exam, s)} {s.answer}\n\n" for s in pool[:k])
        items.append(Item(description + examples + question_text(exam, row), list(LETTERS),
                          LETTERS.index(row.answer), subject))
    return items


# ---- the evaluation ----

def evaluate_exam(model, tokenizer, exam: str, data: str, *, split: str, subjects: list[str] | None = None,
                  num_fewshot: int = 5, limit: int | None = None, batch_size: int = 16,
                  strategy: str = "packed", progress: bool = True) -> dict:
    """Accuracy per subject, per category and overall; `records` holds every question's scores."""
    names = check_subjects(exam, subjects)
    items = []
    for subject in names:
        rows = load_subject(exam, data, subject, split)[:limit]
        shots = load_subject(exam, data, subject, "dev") if num_fewshot else []
        items += subject_items(exam, subject, rows, shots, num_fewshot, same_split=split == "dev")
    start = time.perf_counter()
    records = evaluate_items(model, tokenizer, items, batch_size=batch_size, strategy=strategy, progress=progress)
    seconds = time.perf_counter() - start
    return {**summarize(exam, records), "seconds": round(seconds, 3),
            "items_per_s": round(len(records) / seconds, 2), "records": records}


def check_subjects(exam: str, subjects: list[str] | None) -> list[str]:
    known = exams()[exam]["subjects"]
    for s in subjects or []:
        if s not in known:
            raise LlmlabError(f"unknown {exam} subject '{s}'{closest(s, known)}; the subjects are listed in "
                              "llmlab/evaluate/exams.yaml")
    return list(subjects) if subjects else sorted(known)


def summarize(exam: str, records: list[dict]) -> dict:
    spec = exams()[exam]
    by_subject = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r)
    categories = {c: accuracy([r for s, rs in by_subject.items() if c in spec["subjects"][s][1:] for r in rs])
                  for c in spec["categories"]}
    subjects = {s: accuracy(rs) for s, rs in sorted(by_subject.items())}
    return {**accuracy(records), "subject_mean": sum(s["acc"] for s in subjects.values()) / max(len(subjects), 1),
            "categories": {c: a for c, a in categories.items() if a["n"]}, "subjects": subjects}


# ---- the `llmlab eval mmlu | cmmlu | ceval` verbs ----

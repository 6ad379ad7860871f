"""Decontamination: drop (or flag) training documents that share an n-gram with an evaluation item.

T. Brown et al., "Language Models are Few-Shot Learners" (GPT-3), 2020,
https://arxiv.org/abs/2005.14165, appendix C, and H. Touvron et al., "LLaMA" (2023) report
contamination by 13-gram overlap between training documents and benchmark items:

    contaminated(d)  ⇔  grams_n(d) ∩ ⋃_{x ∈ eval} grams_n(x) ≠ ∅,   n = 13,

over normalised word tokens (NFKC, lowercase, punctuation dropped; each CJK character is a
token, so Chinese items are matched by 13-character runs). An item shorter than n tokens
contributes its whole token sequence as one shorter gram, unless it is shorter than `min_ngram`
tokens (GPT-3 likewise lowered n for short items and skipped the shortest).

Evaluation sets are files the user names, one entry per benchmark:

    benchmarks:
      - {name: mmlu, path: "../shared/data/mmlu/val/*.csv", fields: ["0", "1", "2", "3", "4"]}
      - {name: arc, path: "../shared/data/arc/*/train.json"}               # the `instruction` field
      - {name: gsm8k, path: "../shared/data/gsm8k/train.jsonl", fields: [question]}

`path` is a glob of .jsonl, .json (a list of objects), .csv or .txt (one item per line) files.
`fields` names the fields joined into an item's text; digits name CSV columns of a file without
a header (MMLU's layout). Left out, the first of question / Question / instruction / prompt /
problem / text / query is used, or column 0 of a header-less CSV. The index maps each gram to
(benchmark, item), so every dropped document says which benchmark it matched (a gram that two
benchmarks share is credited to the one listed first).
"""

import csv
import dataclasses
import glob
import json
import re
from dataclasses import dataclass
from typing import Iterator, Literal

from llmlab.config import field
from llmlab.data.steps.base import Step, StepLog
from llmlab.data.steps.exact_dedup import words
from llmlab.data.text import lines
from llmlab.errors import LlmlabError, closest

QUESTION_KEYS = ("question", "Question", "instruction", "prompt", "problem", "text", "query")


@dataclass(frozen=True)
class EvalFiles:
    """A named set of text files whose items are the texts of `fields` (a benchmark, or held-out text)."""
    name: str
    path: str
    fields: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, entry: dict) -> "EvalFiles":
        fields = entry.get("fields") or ()
        fields = [fields] if isinstance(fields, (str, int)) else fields  # `fields: question` means one field
        return cls(str(entry["name"]), str(entry["path"]), tuple(str(f) for f in fields))


def read_items(bench: EvalFiles) -> list[str]:
    """The item texts of one benchmark's files, in file order."""
    files = sorted(glob.glob(bench.path, recursive=True))
    if not files:
        raise LlmlabError(f"'{bench.name}': no file matches {bench.path}; check the path or glob")
    items = []
    for path in files:
        try:
            items += _read_file(path, bench.fields)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
            raise LlmlabError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    return [t for t in items if t.strip()]


def _read_file(path: str, fields: tuple[str, ...]) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):
            return _csv_items(list(csv.reader(f)), fields, path)
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        elif path.endswith(".json"):
            rows = json.load(f)
        else:
            return lines(f.read())
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LlmlabError(f"{path} must hold JSON objects (a list, or one per line)")
    keys = list(fields) or [next((k for k in QUESTION_KEYS if rows and k in rows[0]), "")]
    missing = [k for k in keys if rows and k not in rows[0]]
    if missing:
        raise LlmlabError(f"{path} has no field '{missing[0]}'{closest(missing[0], rows[0])}; "
                          f"its fields are {', '.join(rows[0])}")
    return [" ".join(str(r.get(k, "")) for k in keys) for r in rows]


def _csv_items(rows: list[list[str]], fields: tuple[str, ...], path: str) -> list[str]:
    if not rows:
        return []
    if fields and all(f.isdigit() for f in fields):       # columns of a header-less file (MMLU)
        columns, body = [int(f) for f in fields], rows
    elif fields:
        missing = [f for f in fields if f not in rows[0]]
        if missing:
            raise LlmlabError(f"{path} has no column '{missing[0]}'{closest(missing[0], rows[0])}; "
                              f"its header is {', '.join(rows[0])}")
        columns, body = [rows[0].index(f) for f in fields], rows[1:]
    else:
        known = [k for k in QUESTION_KEYS if k in rows[0]]
        columns, body = ([rows[0].index(known[0])], rows[1:]) if known else ([0], rows)
    return [" ".join(r[c] for c in columns if c < len(r)) for r in body]


class ContaminationIndex:
    """Every n-gram of every evaluation item → (benchmark, item number)."""

    def __init__(self, ngram: int = 13, min_ngram: int = 8):
        self.ngram, self.min_ngram = ngram, min_ngram
        self.grams: dict[int, tuple[str, int]] = {}   # hash of a token tuple (this process only) -> where
        self.lengths: set[int] = set()                 # gram lengths present: n, and shorter whole items
        self.items: dict[str, int] = {}

    def add(self, name: str, texts: list[str]):
        for number, text in enumerate(texts):
            tokens = words(text)
            if len(tokens) < self.min_ngram:
                continue
            size = min(self.ngram, len(tokens))
            self.lengths.add(size)
            for i in range(len(tokens) - size + 1):
                self.grams.setdefault(hash(tuple(tokens[i:i + size])), (name, number))
        self.items[name] = len(texts)

    def match(self, text: str) -> dict[str, tuple[int, str]]:
        """{benchmark: (item number, the shared gram)} for every benchmark that shares a gram with text."""
        tokens, found = words(text), {}
        for size in sorted(self.lengths, reverse=True):
            for i in range(len(tokens) - size + 1):
                hit = self.grams.get(hash(tuple(tokens[i:i + size])))
                if hit and hit[0] not in found:
                    found[hit[0]] = (hit[1], " ".join(tokens[i:i + size]))
        return found


_INDEXES: dict[tuple, ContaminationIndex] = {}  # one per configuration per process: workers build their own


def build_index(benchmarks: list[EvalFiles], ngram: int = 13, min_ngram: int = 8) -> ContaminationIndex:
    key = (tuple(benchmarks), ngram, min_ngram)
    if key not in _INDEXES:
        index = ContaminationIndex(ngram, min_ngram)
        for bench in benchmarks:
            index.add(bench.name, read_items(bench))
        _INDEXES[key] = index
    return _INDEXES[key]


@dataclass
class DecontaminateConfig:
    benchmarks: list[dict] = field([], help="evaluation sets: a list of {name, path (glob), fields (optional)}")
    ngram: int = field(13, help="tokens per compared n-gram (GPT-3 and LLaMA: 13)")
    min_ngram: int = field(8, help="items shorter than this many tokens are not used")
    action: Literal["drop", "flag"] = field("drop", help="drop contaminated documents, or keep them with a "
                                                         "`contamination` field")

    def __post_init__(self):
        if not self.benchmarks:
            raise LlmlabError("decontaminate.benchmarks is empty; give a list of {name, path, fields} entries")
        names = [f.name for f in dataclasses.fields(EvalFiles)]
        for i, entry in enumerate(self.benchmarks):
            where = f"decontaminate.benchmarks[{i}]"
            if not isinstance(entry, dict):
                raise LlmlabError(f"{where} must be a mapping like {{name: mmlu, path: 'mmlu/val/*.csv'}}")
            for key in entry:
                if key not in names:
                    raise LlmlabError(f"unknown key '{where}.{key}'{closest(str(key), names)}; "
                                      f"valid keys: {', '.join(names)}")
            if not entry.get("name") or not entry.get("path"):
                raise LlmlabError(f"{where} needs both a name and a path")
            if not re.fullmatch(r"[\w.-]+", str(entry["name"])):  # it names the drop reason and its sample file
                raise LlmlabError(f"{where}.name '{entry['name']}' may hold only letters, digits, _ . and -")
        if not 1 <= self.min_ngram <= self.ngram:
            raise LlmlabError(f"decontaminate: need 1 ≤ min_ngram ≤ ngram, got {self.min_ngram} and {self.ngram}")

    def parsed(self) -> list[EvalFiles]:
        return [EvalFiles.from_dict(b) for b in self.benchmarks]


class Decontaminate(Step):
    """Drop or flag documents sharing an n-gram with an evaluation item; reasons name the benchmark."""
    name = "decontaminate"
    Config = DecontaminateConfig

    def process(self, docs: Iterator[dict], log: StepLog) -> Iterator[dict]:
        index = build_index(self.cfg.parsed(), self.cfg.ngram, self.cfg.min_ngram)
        for doc in docs:
            found = index.match(doc["text"])
            if not found:
                yield doc
                continue
            report = {name: {"item": item, "ngram": gram} for name, (item, gram) in found.items()}
            if self.cfg.action == "drop":
                log.drop({**doc, "contamination": report}, f"contaminated_{next(iter(found))}")
                continue
            for name in found:
                log.modified(doc, f"contaminated_{name}")
            yield {**doc, "contamination": report}


__all__ = ["EvalFiles", "read_items", "ContaminationIndex", "build_index", "DecontaminateConfig", "Decontaminate"]

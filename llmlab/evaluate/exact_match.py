"""Exact match: greedy answers compared with the one right answer of each instruction.

Each alpaca row is asked exactly as supervised fine-tuning trains on it: the user message is the
instruction, then a blank line and the input if there is one (`alpaca_message`), rendered with
the tokenizer's chat template and no system message of ours (a template may add its default
one, as SmolLM2's does, in training too). The reply is generated greedily by llmlab's own loop
(`llmlab.generation.generate`) and scored

    accuracy = 1/N Σ_i [ norm(reply_i) == norm(output_i) ]

where `norm` strips surrounding whitespace, one trailing period and surrounding quotes, and drops
thousands separators from numbers ("7,000." -> "7000"). Case is kept: the upper/lower-case tasks
of `llmlab.data.tasks` are about case, so "Plant" is not "PLANT".

A second number, `contains_accuracy`, counts replies in which the answer appears as a whole word
("The sum is 432."): it tells a model that knows the answer but wraps it in a sentence from one
that does not know it, i.e. how much of a fine-tune's gain is format and how much is content.
"""

import re
import time
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from llmlab.data.tasks import alpaca_message
from llmlab.data.text import read_jsonl
from llmlab.errors import LlmlabError
from llmlab.generation.generate import SamplingConfig, generate

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_QUOTES = "\"'`“”‘’"


def normalise(text: str) -> str:
    """The answer as compared: see the module docstring."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return _THOUSANDS.sub("", text)


def is_correct(prediction: str, reference: str) -> bool:
    return normalise(prediction) == normalise(reference)


def contains(prediction: str, reference: str) -> bool:
    """Whether the answer appears in the reply as a whole word (not inside a longer word or number)."""
    ref = normalise(reference)
    return bool(ref) and re.search(rf"(?<!\w){re.escape(ref)}(?!\w)", _THOUSANDS.sub("", prediction)) is not None


def exact_match(model, tokenizer, rows: list[dict], *, chat: bool = True, max_new_tokens: int = 16,
                batch_size: int = 16, progress: bool = True) -> dict:
    """Score greedy replies to alpaca `rows`; `examples` holds every row with its prediction."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    prompts = [alpaca_message(r) for r in rows]
    predictions, start = [], time.perf_counter()
    bar = tqdm(total=len(rows), unit="item", desc="exact match", disable=not progress)
    for i in range(0, len(prompts), batch_size):
        predictions += generate(model, tokenizer, prompts[i:i + batch_size], cfg, chat=chat, batch_size=batch_size)
        bar.update(len(prompts[i:i + batch_size]))
    bar.close()
    examples = [{**row, "prediction": pred, "correct": is_correct(pred, row["output"]),
                 "contains": contains(pred, row["output"])} for row, pred in zip(rows, predictions)]
    return {**_score(examples), "by_kind": _by_kind(examples),
            "seconds": round(time.perf_counter() - start, 3), "examples": examples}


def _score(examples: list[dict]) -> dict:
    n = len(examples)
    correct = sum(e["correct"] for e in examples)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "total": n,
            "contains_accuracy": sum(e["contains"] for e in examples) / n if n else 0.0}


def _by_kind(examples: list[dict]) -> dict:
    """Scores per task kind, for rows that carry a `kind` field (those of `llmlab data tasks` do)."""
    groups = defaultdict(list)
    for e in examples:
        if "kind" in e:
            groups[e["kind"]].append(e)
    return {kind: _score(group) for kind, group in sorted(groups.items())}


def read_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    """Alpaca rows from a .jsonl file: each an object with string `instruction` and `output`."""
    rows = []
    for number, row in read_jsonl(path):
        if not (isinstance(row.get("instruction"), str)
                and isinstance(row.get("output"), str) and isinstance(row.get("input", ""), str)):
            raise LlmlabError(f"{path}:{number}: each row must be an object with string 'instruction' and "
                              "'output' fields (and optionally 'input'), as alpaca data has")
        rows.append(row)
    if not rows:
        raise LlmlabError(f"{path} holds no rows")
    return rows[:limit]


# ---- the `llmlab eval em` verb ----

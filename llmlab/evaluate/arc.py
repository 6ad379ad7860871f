"""ARC-Easy and ARC-Challenge: grade-school science questions, scored as lm-eval 0.4's arc_easy/arc_challenge.

Clark et al., "Think you have Solved Question Answering? Try ARC, the AI2 Reasoning Challenge",
https://arxiv.org/abs/1803.05457

Each question is asked as

    Question: {question}\\nAnswer:

and every choice's text is a continuation " {text}" (3 to 5 choices). ARC's choices are sentences of
different lengths, so acc and acc_norm (log-likelihood per character) differ here; lm-eval reports
both. k-shot examples come from the train split, drawn as lm-eval draws them: `random.Random(1234)`
samples k for each question in turn (k + 1 with the question itself removed when the question is in
the same split). The default is lm-eval's 0-shot.

Files: `<data>/ARC-Easy/<split>.json` in LLM-Adapters' re-formatted layout (../shared/data/arc), or
`<split>.jsonl` with AllenAI's or the hub's rows; or the hub id allenai/ai2_arc.
"""

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from llmlab.data.text import read_jsonl, read_text
from llmlab.errors import LlmlabError
from llmlab.evaluate.multiple_choice import Item, accuracy, evaluate_items

SUBSETS = {"easy": "ARC-Easy", "challenge": "ARC-Challenge"}
HUB_SPLITS = {"val": "validation"}
FEWSHOT_SEED = 1234  # lm-eval's default few-shot seed

_LLM_ADAPTERS = re.compile(r"Please choose the correct answer to the question: (.*)\n\n(Answer1: .*)\n\n"
                           r"Answer format: (\S+)", re.DOTALL)


@dataclass
class Question:
    question: str
    choices: list[str]
    gold: int


# ---- reading ----

def read_arc(path: str | Path) -> list[Question]:
    """Questions from a .json array (LLM-Adapters) or .jsonl (AllenAI or hub rows); errors name file and row."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)  # (line number, object)
    else:
        try:
            array = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise LlmlabError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(array, list):
            raise LlmlabError(f"{path} must hold a JSON array of questions")
        rows = list(enumerate(array, 1))
    questions = [_parse(row, path, n) for n, row in rows]
    if not questions:
        raise LlmlabError(f"{path} holds no questions")
    return questions


def _parse(row, path: Path, n: int) -> Question:
    if not isinstance(row, dict):
        raise LlmlabError(f"{path} row {n}: expected an object, got {type(row).__name__}")
    if "instruction" in row:
        return _parse_llm_adapters(row, path, n)
    if "question" not in row or "answerKey" not in row:
        raise LlmlabError(f"{path} row {n}: needs 'question' and 'answerKey' (hub/AllenAI rows) or "
                          "'instruction' and 'answer' (LLM-Adapters rows)")
    question, choices = row["question"], row.get("choices")
    if isinstance(question, dict):  # AllenAI: {"stem": …, "choices": [{"text", "label"}, …]}
        question, choices = question.get("stem"), {"text": [c["text"] for c in question.get("choices", [])],
                                                   "label": [c["label"] for c in question.get("choices", [])]}
    if not isinstance(choices, dict) or not choices.get("text") or len(choices["text"]) != len(choices["label"]):
        raise LlmlabError(f"{path} row {n}: 'choices' must hold lists 'text' and 'label' of the same length")
    if row["answerKey"] not in choices["label"]:
        raise LlmlabError(f"{path} row {n}: answerKey '{row['answerKey']}' is not one of the labels "
                          f"{', '.join(choices['label'])}")
    return Question(question, list(choices["text"]), choices["label"].index(row["answerKey"]))


def _parse_llm_adapters(row: dict, path: Path, n: int) -> Question:
    match = _LLM_ADAPTERS.fullmatch(row["instruction"].strip())
    if not match:
        raise LlmlabError(f"{path} row {n}: the instruction is not 'Please choose the correct answer to the "
                          "question: …\\n\\nAnswer1: … Answer2: …\\n\\nAnswer format: answer1/…'")
    question, listed, fmt = match.groups()
    parts = re.split(r"(?:^| )Answer(\d+): ", listed)[1:]  # number, text, number, text, …
    numbers, choices = [int(p) for p in parts[0::2]], parts[1::2]
    if numbers != list(range(1, len(choices) + 1)) or len(fmt.split("/")) != len(choices):
        raise LlmlabError(f"{path} row {n}: the choices are not numbered Answer1 … Answer{len(fmt.split('/'))}")
    answer = str(row.get("answer", "")).strip()
    if not re.fullmatch(r"answer\d+", answer) or not 1 <= int(answer[6:]) <= len(choices):
        raise LlmlabError(f"{path} row {n}: the answer '{answer}' is not one of {fmt}")
    return Question(question, choices, int(answer[6:]) - 1)


def load_subset(data: str, subset: str, split: str) -> list[Question]:
    name = SUBSETS[subset]
    folder = Path(data).expanduser()
    if folder.is_dir():
        for suffix in (".json", ".jsonl"):
            if (folder / name / f"{split}{suffix}").is_file():
                return read_arc(folder / name / f"{split}{suffix}")
        found = sorted(p.stem for p in (folder / name).glob("*.json*"))
        hint = f"; the splits there are {', '.join(found)}: pick one with --split" if found else ""
        raise LlmlabError(f"{folder / name / split}.json not found{hint}")
    if Path(data).suffix or data.startswith((".", "/", "~")):
        raise LlmlabError(f"data folder not found: {data}")
    from datasets import load_dataset

    try:
        table = load_dataset(data, name, split=HUB_SPLITS.get(split, split))
    except Exception as e:  # datasets raises many types for a missing id, split or network
        raise LlmlabError(f"could not load {data} ({name}, {split}) from the hub: "
                          f"{str(e).strip().splitlines()[0][:200]}; pass a local folder with --data") from None
    return [_parse(dict(row), Path(data), n) for n, row in enumerate(table, 1)]


# ---- prompts ----

def arc_items(subset: str, questions: list[Question], shots: list[Question] | None = None, k: int = 0,
              same_split: bool = False) -> list[Item]:
    """lm-eval's arc prompt; k examples per question drawn by lm-eval's seeded sampler."""
    rnd = random.Random(FEWSHOT_SEED)
    items = []
    for i, q in enumerate(questions):
        examples = ""
        if k:
            pool = list(range(len(shots)))
            drawn = [j for j in rnd.sample(pool, k + 1) if j != i][:k] if same_split else rnd.sample(pool, k)
            examples = "".join(f"Question: {shots[j].question}\nAnswer: {shots[j].choices[shots[j].gold]}\n\n"
                               for j in drawn)
        items.append(Item(f"{examples}Question: {q.question}\nAnswer:", q.choices, q.gold, SUBSETS[subset]))
    return items


def evaluate_arc(model, tokenizer, data: str, *, subsets: list[str], split: str = "test", num_fewshot: int = 0,
                 limit: int | None = None, batch_size: int = 16, strategy: str = "packed",
                 progress: bool = True) -> dict:
    """acc and acc_norm per subset (ARC-Easy, ARC-Challenge); `records` holds every question's scores."""
    items = []
    for subset in subsets:
        questions = load_subset(data, subset, split)[:limit]
        shots = load_subset(data, subset, "train") if num_fewshot else None
        if shots is not None and num_fewshot >= len(shots):
            raise LlmlabError(f"{num_fewshot}-shot needs more than {len(shots)} train questions; lower --num-fewshot")
        items += arc_items(subset, questions, shots, num_fewshot, same_split=split == "train")
    start = time.perf_counter()
    records = evaluate_items(model, tokenizer, items, batch_size=batch_size, strategy=strategy, progress=progress)
    seconds = time.perf_counter() - start
    by_subset = {SUBSETS[s]: accuracy([r for r in records if r["subject"] == SUBSETS[s]]) for s in subsets}
    return {**accuracy(records), "subsets": by_subset, "seconds": round(seconds, 3),
            "items_per_s": round(len(records) / seconds, 2), "records": records}


# ---- the `llmlab eval arc` verb ----

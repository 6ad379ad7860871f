"""GSM8K: grade-school math word problems, answered by few-shot chain of thought, as lm-eval's gsm8k_cot.

Cobbe et al., "Training Verifiers to Solve Math Word Problems", https://arxiv.org/abs/2110.14168;
the exemplars are Wei et al.'s, "Chain-of-Thought Prompting Elicits Reasoning in Large Language
Models", https://arxiv.org/abs/2201.11903 (in gsm8k_cot.yaml).

The prompt is k solved exemplars and the question,

    Q: {exemplar question}\\nA: {its reasoning, ending "The answer is N."}\\n\\n   × k (default 8)
    Q: {question}\\nA:

and the reply is generated greedily until "Q:", "</s>", "<|im_end|>" or 256 tokens. The answer is
taken from the reply by lm-eval's two filters,
    strict-match      the first  "The answer is (-?[0-9.,]+)."
    flexible-extract  the last   (-?[$0-9.,]{2,})|(-?[0-9]+)
and scored by exact match with the reference (the text after "####"), both sides with ",", "$",
anything up to "#### " and one final "." removed, ignoring case.
"""

import re
import time
from functools import cache
from importlib import resources
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from llmlab.data.text import read_jsonl
from llmlab.errors import LlmlabError
from llmlab.generation.generate import SamplingConfig, generate

STOP = ["Q:", "</s>", "<|im_end|>"]
STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = [",", r"\$", r"(?s).*#### ", r"\.$"]
INVALID = "[invalid]"


@cache
def exemplars() -> list[dict]:
    text = resources.files("llmlab.evaluate").joinpath("gsm8k_cot.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)["exemplars"]


# ---- data ----

def read_gsm8k(path: str | Path) -> list[dict]:
    """{question, answer} rows of a GSM8K .jsonl file; the answer's last line is '#### N'."""
    rows = []
    for number, row in read_jsonl(path):
        if not (isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
            raise LlmlabError(f"{path}:{number}: each row needs string 'question' and 'answer' fields")
        if "####" not in row["answer"]:
            raise LlmlabError(f"{path}:{number}: the answer has no '#### N' line with the final number")
        rows.append({"question": row["question"], "answer": row["answer"]})
    if not rows:
        raise LlmlabError(f"{path} holds no questions")
    return rows


def load_gsm8k(data: str, split: str = "test") -> list[dict]:
    """Rows from a .jsonl file, a folder holding <split>.jsonl, or the hub id (openai/gsm8k, config main)."""
    path = Path(data).expanduser()
    if path.is_file():
        return read_gsm8k(path)
    if path.is_dir():
        if not (path / f"{split}.jsonl").is_file():
            found = sorted(p.stem for p in path.glob("*.jsonl"))
            raise LlmlabError(f"{path / split}.jsonl not found" + (f"; the splits there are {', '.join(found)}: "
                                                                   "pick one with --split" if found else ""))
        return read_gsm8k(path / f"{split}.jsonl")
    if path.suffix or data.startswith((".", "/", "~")):
        raise LlmlabError(f"data file not found: {data}")
    from datasets import load_dataset

    try:
        table = load_dataset(data, "main", split=split)
    except Exception as e:  # datasets raises many types for a missing id, split or network
        raise LlmlabError(f"could not load {data} ({split}) from the hub: "
                          f"{str(e).strip().splitlines()[0][:200]}; pass a local .jsonl file with --data") from None
    return [{"question": r["question"], "answer": r["answer"]} for r in table]


# ---- prompt and answers ----

def prompt(question: str, k: int = 8) -> str:
    shots = exemplars()
    if not 0 <= k <= len(shots):
        raise LlmlabError(f"gsm8k has {len(shots)} chain-of-thought exemplars; --num-fewshot must be 0 to {len(shots)}")
    return "".join(f"Q: {s['question']}\nA: {s['target']}\n\n" for s in shots[:k]) + f"Q: {question}\nA:"


def reference(answer: str) -> str:
    return answer.split("####")[-1].strip()


def extract(reply: str, how: str = "strict") -> str:
    """lm-eval's regex filters: strict takes the first 'The answer is N.', flexible the last number."""
    matches = (STRICT if how == "strict" else FLEXIBLE).findall(reply)
    if not matches:
        return INVALID
    match = matches[0] if how == "strict" else matches[-1]
    if isinstance(match, tuple):  # the flexible pattern has two groups; one of them matched
        match = next((m for m in match if m), INVALID)
    return match.strip()


def normalise(text: str) -> str:
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def is_correct(extracted: str, answer: str) -> bool:
    return normalise(extracted) == normalise(reference(answer))


def evaluate_gsm8k(model, tokenizer, rows: list[dict], *, num_fewshot: int = 8, max_new_tokens: int = 256,
                   batch_size: int = 8, progress: bool = True) -> dict:
    """Exact match of both filters; `records` holds each question's reply and extracted answers."""
    prompts = [prompt(r["question"], num_fewshot) for r in rows]
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop=STOP)
    # long prompts first: a batch pads to its longest, and the ETA is not too hopeful
    order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
    replies, start = [None] * len(rows), time.perf_counter()
    bar = tqdm(total=len(rows), unit="q", desc="gsm8k", disable=not progress)
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        for i, reply in zip(batch, generate(model, tokenizer, [prompts[i] for i in batch], cfg,
                                            chat=False, batch_size=batch_size)):
            replies[i] = reply
        bar.update(len(batch))
    bar.close()
    records = []
    for row, reply in zip(rows, replies):
        strict, flexible = extract(reply, "strict"), extract(reply, "flexible")
        records.append({"question": row["question"], "reference": reference(row["answer"]), "reply": reply,
                        "strict": strict, "flexible": flexible,
                        "strict_match": float(is_correct(strict, row["answer"])),
                        "flexible_extract": float(is_correct(flexible, row["answer"]))})
    n, seconds = len(records), time.perf_counter() - start
    return {"strict_match": sum(r["strict_match"] for r in records) / n,
            "flexible_extract": sum(r["flexible_extract"] for r in records) / n, "n": n,
            "seconds": round(seconds, 3), "items_per_s": round(n / seconds, 3), "records": records}


# ---- the `llmlab eval gsm8k` verb ----

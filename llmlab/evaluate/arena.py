"""Arena: pairwise battles between models' answers, judged, turned into Elo ratings.

Ranking-based feedback (Chatbot Arena, Zheng et al. 2023, https://arxiv.org/abs/2306.05685):
every model answers the same prompts; for each prompt and each pair (a, b) a judge says which
answer is better, or that they tie. Each battle moves the two ratings by

    E_a = 1 / (1 + 10^((R_b − R_a) / 400)),   R_a ← R_a + K·(S_a − E_a),   R_b ← R_b − K·(S_a − E_a)

with S_a = 1, ½ or 0. Online Elo depends on the order of battles, so, as Chatbot Arena does,
the reported rating is the median over bootstrap rounds (battles resampled with replacement and
shuffled) and the 95% interval is the 2.5th–97.5th percentile of those rounds.

The judge is a model or a person. A model judge reads both answers and we compare the
probability it gives to "A" and to "B" as its next token (no sampling, no parsing). Judges
prefer whichever answer comes first or second (position bias), so every pair is judged in both
orders: a verdict stands only when both orders agree, otherwise the battle is a tie.
"""

import itertools
import random
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from llmlab.data.text import lines, read_jsonl
from llmlab.errors import LlmlabError
from llmlab.generation.generate import encode

JUDGE_PROMPT = (
    "Which answer to the question is better: more correct, more helpful and clearer?\n\n"
    "Question: {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
    "Reply with one letter, A or B."
)


# ---- ratings ----

def elo(battles: list[tuple[str, str, float]], models: list[str], k: float = 4.0,
        base: float = 1000.0) -> dict[str, float]:
    """Online Elo over `battles` in order; each is (a, b, score of a: 1 win, 0.5 tie, 0 loss)."""
    rating = dict.fromkeys(models, base)
    for a, b, score in battles:
        expected = 1.0 / (1.0 + 10 ** ((rating[b] - rating[a]) / 400))
        rating[a] += k * (score - expected)
        rating[b] -= k * (score - expected)
    return rating


def bootstrap_elo(battles: list[tuple[str, str, float]], models: list[str], rounds: int = 1000,
                  k: float = 4.0, seed: int = 0) -> dict[str, dict]:
    """Median Elo and 95% interval over `rounds` resamplings of the battles."""
    if not battles:
        raise LlmlabError("no battles to rate: give at least one prompt and two models")
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(models)))
    for r in range(rounds):
        picked = rng.integers(0, len(battles), len(battles))
        rating = elo([battles[i] for i in picked], models, k)
        samples[r] = [rating[m] for m in models]
    lo, mid, hi = np.percentile(samples, [2.5, 50, 97.5], axis=0)
    return {m: {"elo": float(mid[i]), "ci_low": float(lo[i]), "ci_high": float(hi[i])}
            for i, m in enumerate(models)}


def record(battles: list[tuple[str, str, float]], models: list[str]) -> dict[str, dict]:
    """Wins, losses and ties of each model."""
    out = {m: {"wins": 0, "losses": 0, "ties": 0} for m in models}
    for a, b, score in battles:
        if score == 0.5:
            out[a]["ties"] += 1
            out[b]["ties"] += 1
        else:
            winner, loser = (a, b) if score == 1 else (b, a)
            out[winner]["wins"] += 1
            out[loser]["losses"] += 1
    return out


# ---- judges ----

class ModelJudge:
    """Scores P("A") against P("B") as the judge model's next token after the judging prompt."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.letters = [self._token(letter) for letter in "AB"]

    def _token(self, letter: str) -> int:
        ids = self.tokenizer.encode(letter, add_special_tokens=False)
        if len(ids) != 1:
            raise LlmlabError(f"the judge's tokenizer splits '{letter}' into {len(ids)} tokens; "
                              "choose a judge whose vocabulary has the letters A and B")
        return ids[0]

    @torch.inference_mode()
    def prefer_a(self, question: str, a: str, b: str) -> float:
        """The judge's probability that A is the better answer (A and B renormalised)."""
        text = JUDGE_PROMPT.format(question=question, a=a.strip(), b=b.strip())
        ids = encode(self.tokenizer, text, chat=self.tokenizer.chat_template is not None)
        logits = self.model(torch.tensor([ids], device=self.model.device)).logits[0, -1].float()
        pair = torch.softmax(logits[self.letters], dim=-1)
        return float(pair[0])

    def __call__(self, question: str, a: str, b: str) -> tuple[float, dict]:
        first = self.prefer_a(question, a, b)   # a shown as A
        second = self.prefer_a(question, b, a)  # a shown as B
        votes = (first > 0.5, second < 0.5)
        score = 1.0 if all(votes) else 0.0 if not any(votes) else 0.5
        return score, {"p_a_first": round(first, 4), "p_a_second": round(1 - second, 4)}


class HumanJudge:
    """Asks in the terminal; shows the two answers in random order so position cannot leak the model."""

    def __init__(self, seed: int = 0, ask=input, show=print):
        self.rng, self.ask, self.show = random.Random(seed), ask, show

    def __call__(self, question: str, a: str, b: str) -> tuple[float, dict]:
        swapped = self.rng.random() < 0.5
        first, second = (b, a) if swapped else (a, b)
        self.show(f"\n=== Question ===\n{question}\n\n--- Answer 1 ---\n{first.strip()}\n\n"
                  f"--- Answer 2 ---\n{second.strip()}\n")
        while True:
            reply = self.ask("Better answer? [1/2/t(ie)]: ").strip().lower()
            if reply in ("1", "2", "t"):
                break
            self.show("please type 1, 2 or t")
        if reply == "t":
            return 0.5, {"human": "tie"}
        a_won = (reply == "1") != swapped
        return (1.0 if a_won else 0.0), {"human": reply}


def battle(answers: dict[str, list[str]], questions: list[str], judge, progress: bool = True) -> list[dict]:
    """Every pair of models on every question, judged."""
    models = list(answers)
    pairs = list(itertools.combinations(models, 2))
    out = []
    for (i, question), (a, b) in tqdm(list(itertools.product(enumerate(questions), pairs)),
                                      desc="judging", unit="battle", disable=not progress):
        score, detail = judge(question, answers[a][i], answers[b][i])
        out.append({"prompt": i, "a": a, "b": b, "score_a": score, **detail})
    return out


# ---- the `llmlab arena` verb ----


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    if not path:
        raise LlmlabError("arena needs prompts: --prompts FILE (.txt one per line, or .jsonl with 'prompt')")
    if not Path(path).is_file():
        raise LlmlabError(f"prompts file not found: {path}")
    if path.endswith(".jsonl"):
        prompts = []
        for number, row in read_jsonl(path):
            if not isinstance(row.get("prompt"), str):
                raise LlmlabError(f"{path}:{number}: each row needs a string 'prompt' field")
            prompts.append(row["prompt"])
    else:
        prompts = [line.strip() for line in lines(Path(path).read_text(encoding="utf-8")) if line.strip()]
    if not prompts:
        raise LlmlabError(f"{path} holds no prompts")
    return prompts[:limit]

"""Best-of-n sampling and RAFT: alignment by keeping the best of several samples, the simplest baselines.

Best-of-n (Nakano et al. 2021, WebGPT; Stiennon et al. 2020): sample n replies per prompt, keep the one the
reward scores highest. It needs no training and is the bar RL methods must clear at equal compute; the run
writes the chosen replies (best_of_n.jsonl: a rejection-sampling dataset) and the mean reward of one sample
against that of the best.

RAFT (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment",
https://arxiv.org/abs/2304.06767): iterate best-of-n on a batch of prompts, then supervised fine-tuning on
the winners, with the improved policy sampling the next round (Llama 2's rejection-sampling fine-tuning
is the same loop).
"""

import dataclasses
import functools

import torch
from tqdm.auto import tqdm

from llmlab.align.online import Online
from llmlab.atomic import atomic_write_jsonl
from llmlab.config import field
from llmlab.data.packing import collate
from llmlab.data.preference import Pair, encode_side
from llmlab.data.sft import chat_template
from llmlab.errors import LlmlabError
from llmlab.generation.generate import pad_id
from llmlab.train import fit
from llmlab.train.losses import sft_loss


@dataclasses.dataclass
class BestOfNConfig:
    n: int = field(4, help="replies sampled per prompt")

    def __post_init__(self):
        if self.n < 2:
            raise LlmlabError(f"--options.n must be at least 2, got {self.n}")


@dataclasses.dataclass
class RAFTConfig(BestOfNConfig):
    rounds: int = field(3, help="sample → select → fine-tune rounds")
    prompts_per_round: int = field(64, help="prompts sampled each round (cycling through --data)")
    min_reward: float | None = field(None, help="keep a winner only if its reward reaches this")


def sample_best(ctx: Online, items: list[dict], n: int, progress: bool = True) -> list[dict]:
    """For each prompt: its n replies' rewards and the best reply."""
    if ctx.sampling.temperature == 0:
        raise LlmlabError("best-of-n needs sampled replies: set --sampling.temperature above 0 (e.g. 1.0)")
    out, per_batch = [], max(1, 32 // n)  # several prompts' n replies decode as one batch
    with tqdm(total=len(items), desc="best-of-n", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(items), per_batch):
            chunk = [item for item in items[start:start + per_batch] for _ in range(n)]
            texts = ctx.replies(chunk)
            scores = ctx.reward(chunk, texts).float().view(-1, n)
            for i, row in enumerate(scores):
                best = int(row.argmax())
                out.append({"messages": chunk[i * n]["messages"], "best": texts[i * n + best],
                            "reward": float(row[best]), "rewards": [round(float(s), 4) for s in row],
                            "first": float(row[0])})
            bar.update(len(chunk) // n)
    return out


@torch.no_grad()
def best_of_n(cfg: BestOfNConfig, ctx: Online) -> dict:
    was_training = ctx.model.training
    ctx.model.eval()
    rows = sample_best(ctx, ctx.train, cfg.n)
    ctx.model.train(was_training)
    if ctx.run is not None:
        atomic_write_jsonl(ctx.run.artifact("best_of_n.jsonl"), rows)
    first, best = (sum(r[k] for r in rows) / len(rows) for k in ("first", "reward"))
    return {"prompts": len(rows), "n": cfg.n, "reward_one_sample": round(first, 4), "reward_best_of_n": round(best, 4)}


def train_raft(cfg: RAFTConfig, ctx: Online) -> dict:
    template = chat_template(ctx.tokenizer, "auto")
    collate_sft = functools.partial(collate, pad_id=pad_id(ctx.model, ctx.tokenizer))
    curve = [{"round": 0, **ctx.evaluate(0)}] if ctx.held else []
    kept_total, steps, result = 0, 0, {}
    for round_ in range(1, cfg.rounds + 1):
        start = (round_ - 1) * cfg.prompts_per_round
        items = [ctx.train[(start + i) % len(ctx.train)] for i in range(min(cfg.prompts_per_round, len(ctx.train)))]
        with torch.no_grad():
            ctx.model.eval()
            winners = sample_best(ctx, items, cfg.n)
        if cfg.min_reward is not None:
            winners = [w for w in winners if w["reward"] >= cfg.min_reward]
        ctx.log(round=round_, reward_one_sample=sum(w["first"] for w in winners) / max(len(winners), 1),
                reward_best=sum(w["reward"] for w in winners) / max(len(winners), 1), kept=len(winners))
        if not winners:
            continue
        examples = [dict(zip(("input_ids", "labels"), encode_side(Pair(w["messages"], "", ""), w["best"],
                                                                  ctx.tokenizer, template))) for w in winners]
        kept_total += len(examples)
        result = fit(ctx.model, sft_loss, examples, ctx.train_cfg, collate=collate_sft, run=ctx.run)
        steps += result["steps"]
        if ctx.held:
            curve.append({"round": round_, **ctx.evaluate(round_)})
    summary = {**result, "steps": steps, "rounds": cfg.rounds, "kept": kept_total}
    if curve:
        summary.update(heldout_before=curve[0]["heldout_reward"], heldout_after=curve[-1]["heldout_reward"],
                       curve=curve)
    return summary

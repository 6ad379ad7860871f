"""What the online methods (PPO, GRPO, best-of-n, RAFT) share: prompts as token ids, the reward, the reference
policy, held-out evaluation, and the glue that runs a method's loss on the one training loop.

A reward is `reward(items, replies) -> (R,) tensor`, for prompt items of `data.preference.load_prompts`:
    exact         1 when the reply equals the row's answer (`llmlab eval em`'s normalisation), else 0:
                  a verifiable reward, for `llmlab data tasks` rows (GRPO's setting in DeepSeekMath)
    contains      exact, with ½ for a reply that states the answer among other words: partial credit for
                  a small model whose sampled replies are rarely the bare answer, so groups are not all 0
    FOLDER        a reward model (`llmlab align --method reward`), scoring the prompt and reply as rendered
                  by its chat template
Any Python callable with that signature works from the API.
"""

import copy
import dataclasses
import logging

import torch

from llmlab.align.reward import load_reward_model, rewards
from llmlab.data.preference import Pair, encode_side
from llmlab.data.sft import chat_template
from llmlab.errors import LlmlabError
from llmlab.evaluate.exact_match import contains, is_correct
from llmlab.generation.generate import SamplingConfig, encode, generate_batch
from llmlab.peft import disabled
from llmlab.train import TrainConfig, fit
from llmlab.train.rl import Rollout, reply_logps

log = logging.getLogger("llmlab")


def encode_prompts(items: list[dict], tokenizer) -> list[dict]:
    for item in items:
        item["ids"] = encode(tokenizer, item["messages"], chat=True)
    return items


def exact_reward(items: list[dict], replies: list[str]) -> torch.Tensor:
    return torch.tensor([float(is_correct(reply, item["answer"])) for item, reply in zip(items, replies)])


def contains_reward(items: list[dict], replies: list[str]) -> torch.Tensor:
    return torch.tensor([1.0 if is_correct(reply, item["answer"]) else 0.5 if contains(reply, item["answer"]) else 0.0
                         for item, reply in zip(items, replies)])


VERIFIABLE = {"exact": exact_reward, "contains": contains_reward}


class ModelReward:
    """Scores with a reward model; its tokenizer must be the policy's, so one rendering serves both."""

    def __init__(self, folder: str, policy_tokenizer, device, batch_size: int = 8):
        self.model, self.tokenizer = load_reward_model(folder)
        if self.tokenizer.get_vocab() != policy_tokenizer.get_vocab():
            raise LlmlabError(f"the reward model {folder} has another tokenizer than the policy; train it from the "
                              "same base model (llmlab align --method reward --model <the policy's model>)")
        self.model.to(device).eval().requires_grad_(False)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, items: list[dict], replies: list[str]) -> torch.Tensor:
        """r(x, y) of each reply, rendered as the reward model saw its training pairs (encode_side)."""
        template = chat_template(self.tokenizer, "auto")
        rows = [encode_side(Pair(item["messages"], "", ""), reply, self.tokenizer, template)[0]
                for item, reply in zip(items, replies)]
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(chunk):
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
            device = self.model.device
            out.append(rewards(self.model, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}).cpu())
        return torch.cat(out)


def make_reward(spec: str, items: list[dict], tokenizer, device):
    if spec in VERIFIABLE:
        missing = next((i for i, item in enumerate(items, 1) if item["answer"] is None), None)
        if missing is not None:
            raise LlmlabError(f"--reward {spec} needs an answer in every row ('output' or 'answer'); prompt {missing} "
                              "has none (use a reward model: --reward FOLDER)")
        return VERIFIABLE[spec]
    if not spec:
        raise LlmlabError("this method needs a reward: --reward exact|contains (rows with answers) or --reward FOLDER "
                          "(a reward model from `llmlab align --method reward`)")
    return ModelReward(spec, tokenizer, device)


def reference_policy(model, whole: bool):
    """π_ref as `ref(model, rollout) -> log-probs`: the policy with its adapters off (one model in memory), or,
    when every weight trains, a frozen copy taken now."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if whole else None

    @torch.no_grad()
    def ref(policy, ro: Rollout) -> torch.Tensor:
        if frozen is not None:
            return reply_logps(frozen, ro)
        with disabled(policy):
            return reply_logps(policy, ro)
    return ref


@dataclasses.dataclass
class Online:
    """Everything an online method's training needs; the stage fills it in."""
    model: object
    tokenizer: object
    train: list[dict]
    held: list[dict]
    reward: object
    reference: object
    sampling: SamplingConfig
    train_cfg: TrainConfig
    run: object = None
    whole: bool = False

    draws: int = 0

    def replies(self, items: list[dict], cfg: SamplingConfig | None = None) -> list[str]:
        """Replies to the prompts; each sampled call draws with a fresh seed."""
        cfg = cfg or self.sampling
        if cfg.temperature > 0:
            self.draws += 1
            cfg = dataclasses.replace(cfg, seed=cfg.seed + self.draws)
        return [g.text for g in generate_batch(self.model, self.tokenizer, [it["ids"] for it in items], cfg)]

    def log(self, **metrics):
        if self.run is not None:
            self.run.log_metrics(**metrics)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """The held-out prompts' mean reward of greedy replies, and their exact-match accuracy where rows have
        answers."""
        if not self.held:
            return {}
        was_training = self.model.training
        self.model.eval()
        greedy = dataclasses.replace(self.sampling, temperature=0.0)
        texts = []
        for start in range(0, len(self.held), 16):
            texts += self.replies(self.held[start:start + 16], greedy)
        self.model.train(was_training)
        scores = self.reward(self.held, texts).float()
        lengths = [len(self.tokenizer(t).input_ids) for t in texts]
        result = {"heldout_reward": round(float(scores.mean()), 4), "heldout_length": sum(lengths) / len(lengths)}
        if all(item["answer"] is not None for item in self.held):
            result["heldout_exact"] = round(float(exact_reward(self.held, texts).mean()), 4)
        self.log(step=step, **result)
        return result


def fit_online(ctx: Online, loss_fn) -> dict:
    """Train with `loss_fn(model, {"prompts": items})` on the one loop, evaluating the held-out prompts before,
    every --train.eval-every steps and at the end; the summary gets the curve."""
    curve = [{"step": 0, **ctx.evaluate(0)}] if ctx.held else []
    every = ctx.train_cfg.eval_every

    def on_log(step: int, metrics: dict):
        if ctx.held and "loss" in metrics and every and step % every == 0:
            curve.append({"step": step, **ctx.evaluate(step)})

    result = fit(ctx.model, loss_fn, ctx.train, ctx.train_cfg, collate=lambda items: {"prompts": items},
                 run=ctx.run, callbacks=[on_log])
    if ctx.held and curve[-1]["step"] != result["steps"]:
        curve.append({"step": result["steps"], **ctx.evaluate(result["steps"])})
    if curve:
        result.update(heldout_before=curve[0]["heldout_reward"], heldout_after=curve[-1]["heldout_reward"],
                      curve=curve)
    return result

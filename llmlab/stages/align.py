"""`llmlab align`: preference alignment with DPO and its family, KTO, reward models, and the online methods
(PPO, GRPO, RAFT, best-of-n), on the one training loop.

    llmlab align --data pairs.json --method dpo --options.beta 0.1 --out runs/dpo        # LoRA on the policy
    llmlab align --data pairs.jsonl --method simpo --tuning full --train.lr 1e-6          # every weight
    llmlab align --data thumbs.jsonl --method kto                                         # unpaired rows
    llmlab align --data pairs.jsonl --method reward --out runs/rm                          # a reward model
    llmlab eval reward --model runs/rm --data heldout.jsonl
    llmlab align --data tasks.jsonl --method grpo --reward exact                          # verifiable reward
    llmlab align --data prompts.jsonl --method ppo --reward runs/rm                        # RLHF

The reference model of DPO-style methods is the policy with its adapters disabled (one model in memory);
with `--tuning full` (or freeze) the reference log-probs are computed once before training, from the
untouched model, and kept in the run folder. SimPO and ORPO need no reference. The run reports, on the
held-out pairs, the preference accuracy of the implicit reward (β · the log-ratio to the reference, or the
mean log-probability for the reference-free methods) and its mean margin.
"""

import dataclasses
import functools
import json
import logging
from typing import Any

import torch

from llmlab import methods
from llmlab.align.online import Online, encode_prompts, make_reward, reference_policy
from llmlab.align.reward import load_reward_model, pairwise_scores, reward_model
from llmlab.atomic import atomic_write
from llmlab.config import build, field
from llmlab.data.packing import to_device
from llmlab.data.preference import collate_pairs, collate_unpaired, load_pairs, load_prompts, load_unpaired
from llmlab.errors import LlmlabError
from llmlab.generation.generate import SamplingConfig
from llmlab.models import save_model
from llmlab.models.load import ModelOptions
from llmlab.peft import apply_method, disabled, merge_and_unload, print_trainable_parameters, save_adapter
from llmlab.runs import RunOptions, start_run
from llmlab.train import TrainConfig, fit, seed_everything
from llmlab.train.losses import sequence_logps

log = logging.getLogger("llmlab")


@dataclasses.dataclass
class AlignTrainConfig(TrainConfig):
    lr: float = field(5e-5, help="peak learning rate (DPO with LoRA; full tuning wants ~1e-6)")
    batch_size: int = field(4, help="preference pairs (online methods: prompts) per micro-batch")


@dataclasses.dataclass
class RolloutConfig(SamplingConfig):
    max_new_tokens: int = field(64, help="the most tokens per sampled reply")
    temperature: float = field(1.0, help="sampling temperature of the rollouts (on-policy: 1.0)")


@dataclasses.dataclass
class AlignConfig(ModelOptions):
    data: str = field("", help="preference pairs (hh-rlhf, sharegpt, messages, plain), unpaired rows (kto) or "
                               "prompts (ppo, grpo, raft, best-of-n): .json/.jsonl/.csv/.parquet")
    method: str = field("dpo", help=", ".join(methods.names("align")))
    options: dict[str, Any] = field({}, help="the method's options, e.g. --options.beta 0.1")
    tuning: str = field("lora", help="what trains: a fine-tuning method (lora, dora, ia3, …) or full")
    adapter: dict[str, Any] = field({}, help="the tuning method's options, e.g. --adapter.r 16")
    template: str = field("auto", help="auto (the tokenizer's chat template) or alpaca")
    max_len: int = field(512, help="tokens per side (prompt + reply); longer pairs are left out and counted")
    limit: int | None = field(None, help="use only the first N pairs of --data")
    eval_fraction: float = field(0.1, help="hold out this fraction of the pairs to measure preference accuracy")
    reward: str = field("", help="online methods: exact or contains (rows' answers), or a reward model folder")
    sampling: RolloutConfig = field(default_factory=RolloutConfig, help="online methods: how replies are sampled")
    train: AlignTrainConfig = field(default_factory=AlignTrainConfig, help="the training loop")
    save: bool = field(True, help="save the adapter (or the model, with --tuning full) in the run folder")

    @staticmethod
    def more_help() -> str:
        return "\n\n--options.* of each --method:\n" + methods.options_help("align")

    def __post_init__(self):
        methods.check("align", self.method)
        cfg_cls, _, _ = methods.load("align", self.method)
        build(cfg_cls, self.options, "options")  # fail before loading anything
        methods.check("finetune", self.tuning, "--tuning")
        if not 0 <= self.eval_fraction < 1:
            raise LlmlabError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_len < 4:
            raise LlmlabError(f"--max-len must be at least 4, got {self.max_len}")


def align_verb(cfg: AlignConfig, opts: RunOptions) -> dict:
    if not cfg.data:
        raise LlmlabError("align needs preference pairs: --data FILE (chosen/rejected rows)")
    cfg_cls, make_loss, entry = methods.load("align", cfg.method)
    method_cfg = build(cfg_cls, cfg.options, "options")
    model, tokenizer = cfg.load_model()
    if entry.extra.get("online"):
        return _align_online(cfg, opts, method_cfg, make_loss, entry, model, tokenizer)
    unpaired = bool(entry.extra.get("unpaired"))
    load = load_unpaired if unpaired else load_pairs
    pairs, stats = load(cfg.data, tokenizer, template=cfg.template, max_len=cfg.max_len, limit=cfg.limit)
    if stats["too_long"]:
        log.warning("%d of %d %s are longer than --max-len %d and were left out", stats["too_long"], stats["rows"],
                    "completions" if unpaired else "pairs", cfg.max_len)
    n_eval = round(cfg.eval_fraction * len(pairs))
    train, held = pairs[n_eval:], pairs[:n_eval]
    if not train:
        raise LlmlabError(f"--eval-fraction {cfg.eval_fraction} leaves no training pairs of {len(pairs)}")
    collate = functools.partial(collate_unpaired if unpaired else collate_pairs, pad_id=tokenizer.pad_token_id)
    whole = bool(methods.entry("finetune", cfg.tuning).extra.get("whole_model"))
    needs_reference = bool(entry.extra.get("reference"))
    is_reward = bool(entry.extra.get("reward_model"))
    if is_reward:
        model = reward_model(model)
    with start_run("align", cfg, opts) as run:
        if needs_reference and whole:  # no adapters to switch off: the reference is computed before training
            _attach_reference(model, pairs, collate, cfg.train.batch_size)
            atomic_write(run.artifact("ref_logps.json"), json.dumps([p["ref_logps"] for p in pairs]) + "\n")
        seed_everything(cfg.train.seed)
        model = apply_method(model, cfg.tuning, cfg.adapter, tokenizer=tokenizer)
        if is_reward:  # the new head always trains, whatever the adapters wrap
            model.get_submodule(model.llmlab_head_name).requires_grad_(True)
        print_trainable_parameters(model)
        loss_fn = make_loss(method_cfg, None if whole else _reference_with_adapters_off, cfg.method)
        result = fit(model, loss_fn, train, cfg.train, collate=collate, run=run)
        if is_reward:
            scores = _reward_scores(pairwise_scores(model, held, collate, cfg.train.batch_size)) if held else {}
        elif unpaired:
            scores = kto_scores(model, held, collate, cfg.train.batch_size, method_cfg.beta, not whole) if held else {}
        else:
            scores = preference_scores(model, held, collate, cfg.train.batch_size, getattr(method_cfg, "beta", 1.0),
                                       needs_reference and not whole) if held else {}
        saved = None
        if cfg.save and is_reward:  # a reward model is used on its own: saved whole, adapters merged in
            saved = save_model(model if whole else merge_and_unload(model), tokenizer, run.path / "model")
        elif cfg.save:
            saved = save_model(model, tokenizer, run.path / "model") if whole else run.path / "adapter"
            if not whole:
                save_adapter(model, saved)
        noun = "completions" if unpaired else "pairs"
        summary = run.finish({"model": cfg.model, "method": cfg.method, "tuning": cfg.tuning, **stats,
                              f"train_{noun}": len(train), f"eval_{noun}": len(held), **result, **scores,
                              "saved": str(saved) if saved else None})
    shown = (f", held-out preference accuracy {scores['pref_accuracy']:.1%} (margin {scores['reward_margin']:.3f})"
             if scores else "")
    print(f"aligned {cfg.model} with {cfg.method} ({cfg.tuning}) on {len(train)} {noun} for {result['steps']} steps, "
          f"loss {result['train_loss']:.4f}{shown} -> {saved or run.path}")
    return summary


def _align_online(cfg: AlignConfig, opts: RunOptions, method_cfg, train_fn, entry, model, tokenizer) -> dict:
    """PPO, GRPO, RAFT and best-of-n: prompts in, sampled replies scored by --reward."""
    items = load_prompts(cfg.data, limit=cfg.limit)
    items = encode_prompts(items, tokenizer)
    kept = [item for item in items if len(item["ids"]) <= cfg.max_len]
    if len(kept) < len(items):
        log.warning("%d of %d prompts are longer than --max-len %d and were left out", len(items) - len(kept),
                    len(items), cfg.max_len)
    if not kept:
        raise LlmlabError(f"no prompts left in {cfg.data}: all {len(items)} are longer than --max-len {cfg.max_len}")
    sampling_only = bool(entry.extra.get("sampling_only"))
    n_eval = 0 if sampling_only else round(cfg.eval_fraction * len(kept))
    train, held = kept[n_eval:], kept[:n_eval]
    if not train:
        raise LlmlabError(f"--eval-fraction {cfg.eval_fraction} leaves no training prompts of {len(kept)}")
    reward = make_reward(cfg.reward, kept, tokenizer, model.device)
    whole = bool(methods.entry("finetune", cfg.tuning).extra.get("whole_model"))
    with start_run("align", cfg, opts) as run:
        seed_everything(cfg.train.seed)
        if not sampling_only:
            model = apply_method(model, cfg.tuning, cfg.adapter, tokenizer=tokenizer)
            print_trainable_parameters(model)
        reference = reference_policy(model, whole) if entry.extra.get("reference") and not sampling_only else None
        ctx = Online(model, tokenizer, train, held, reward, reference, cfg.sampling, cfg.train, run, whole)
        result = train_fn(method_cfg, ctx)
        saved = None
        if cfg.save and not sampling_only:
            saved = save_model(model, tokenizer, run.path / "model") if whole else run.path / "adapter"
            if not whole:
                save_adapter(model, saved)
        summary = run.finish({"model": cfg.model, "method": cfg.method, "tuning": cfg.tuning, "reward": cfg.reward,
                              "prompts": len(items), "too_long": len(items) - len(kept), "train_prompts": len(train),
                              "eval_prompts": len(held), **result, "saved": str(saved) if saved else None})
    if sampling_only:
        print(f"best-of-{result['n']} on {result['prompts']} prompts: mean reward {result['reward_one_sample']:.3f} "
              f"for one sample, {result['reward_best_of_n']:.3f} for the best -> {run.path / 'best_of_n.jsonl'}")
    else:
        shown = (f", held-out reward {result['heldout_before']:.3f} -> {result['heldout_after']:.3f}"
                 if "heldout_before" in result else "")
        print(f"aligned {cfg.model} with {cfg.method} ({cfg.tuning}) on {len(train)} prompts for {result['steps']} "
              f"steps{shown} -> {saved or run.path}")
    return summary


def _reward_scores(scores: dict) -> dict:
    """A reward model's held-out scores under the names the summary shares with the policy methods."""
    return {"pref_accuracy": scores["pairwise_accuracy"], "reward_margin": scores["margin_mean"],
            "margin_quartiles": scores["margin_quartiles"]}


@dataclasses.dataclass
class RewardEvalConfig:
    model: str = field("", help="the reward model: a folder or the run folder of `llmlab align --method reward`")
    data: str = field("", help="held-out preference pairs (any format `llmlab align` reads)")
    template: str = field("auto", help="auto (the tokenizer's chat template) or alpaca")
    max_len: int = field(1024, help="tokens per side; longer pairs are left out and counted")
    limit: int | None = field(None, help="score only the first N pairs")
    batch_size: int = field(8, help="pairs per forward pass")


def reward_eval_verb(cfg: RewardEvalConfig, opts: RunOptions) -> dict:
    """`llmlab eval reward`: pairwise accuracy and the margin distribution of a reward model on held-out pairs."""
    if not cfg.model or not cfg.data:
        raise LlmlabError("eval reward needs --model (a reward model folder) and --data (preference pairs)")
    model, tokenizer = load_reward_model(cfg.model)
    pairs, stats = load_pairs(cfg.data, tokenizer, template=cfg.template, max_len=cfg.max_len, limit=cfg.limit)
    collate = functools.partial(collate_pairs, pad_id=tokenizer.pad_token_id)
    with start_run("eval reward", cfg, opts) as run:
        scores = pairwise_scores(model, pairs, collate, cfg.batch_size)
        run.log_metrics(pairwise_accuracy=scores["pairwise_accuracy"], margin_mean=scores["margin_mean"])
        summary = run.finish({"model": cfg.model, "data": cfg.data, **stats, **scores})
    print(f"reward model {cfg.model}: pairwise accuracy {scores['pairwise_accuracy']:.1%} on {scores['pairs']} pairs, "
          f"margin mean {scores['margin_mean']:.3f} (quartiles {scores['margin_quartiles']}) -> {summary['path']}")
    return summary


def _reference_with_adapters_off(model, batch: dict) -> torch.Tensor:
    """π_ref: the same model with every adapter switched off, no gradient."""
    with disabled(model), torch.no_grad():
        return sequence_logps(model, batch)[0]


@torch.no_grad()
def _attach_reference(model, pairs: list[dict], collate, batch_size: int):
    """Each pair's (chosen, rejected) reference log-probs, from the model before any training."""
    was_training = model.training
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        logps = sequence_logps(model, to_device(collate(chunk), model.device))[0].tolist()
        for i, pair in enumerate(chunk):
            pair["ref_logps"] = (logps[i], logps[len(chunk) + i])
    model.train(was_training)


@torch.no_grad()
def kto_scores(model, items: list[dict], collate, batch_size: int, beta: float, adapters: bool) -> dict:
    """How often a held-out completion's implicit reward β·r falls on its label's side of the reference point
    β·z (z: the KL estimate on the mismatched sides), and the mean reward gap of desirable over undesirable."""
    model.eval()
    rewards, labels, kls = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = to_device(collate(chunk), model.device)
        logps = sequence_logps(model, batch)[0]
        ref = batch["ref_logps"].to(logps) if "ref_logps" in batch else _reference_with_adapters_off(model, batch)
        r = beta * (logps - ref)
        rewards += r[:len(chunk)].tolist()
        kls += r[len(chunk):].tolist()
        labels += batch["desirable"].tolist()
    z = max(0.0, sum(kls) / len(kls))
    right = sum((r > z) == d for r, d in zip(rewards, labels))
    good = [r for r, d in zip(rewards, labels) if d] or [0.0]
    bad = [r for r, d in zip(rewards, labels) if not d] or [0.0]
    return {"pref_accuracy": right / len(items), "reward_margin": sum(good) / len(good) - sum(bad) / len(bad)}


@torch.no_grad()
def preference_scores(model, pairs: list[dict], collate, batch_size: int, beta: float, reference: bool) -> dict:
    """How often the implicit reward prefers the chosen reply, and by how much on average: β · the log-ratio to
    the reference (adapters off, or precomputed), else the mean log-probability of the reply."""
    model.eval()
    wins, margins = 0, []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = to_device(collate(chunk), model.device)
        logps, counts = sequence_logps(model, batch)
        if "ref_logps" in batch or reference:
            ref = batch["ref_logps"].to(logps) if "ref_logps" in batch else _reference_with_adapters_off(model, batch)
            rewards = beta * (logps - ref)
        else:
            rewards = logps / counts
        half = len(chunk)
        margin = rewards[:half] - rewards[half:]
        wins += int((margin > 0).sum())
        margins += margin.tolist()
    return {"pref_accuracy": wins / len(pairs), "reward_margin": sum(margins) / len(margins)}

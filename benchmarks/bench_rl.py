"""GRPO on a verifiable reward and PPO on a reward model, on the built-in model: held-out curves against steps.

    .venv/bin/python benchmarks/bench_rl.py grpo [--steps 40]     # tasks of `llmlab data tasks`
    .venv/bin/python benchmarks/bench_rl.py ppo --rm bench-align/rm [--steps 24]

GRPO: the built-in model after --sft-steps of LoRA SFT (batch 8, lr 1e-3) on 120 other task items, merged:
on the raw model every sampled group scores 0 and GRPO has no signal (DeepSeekMath also starts from SFT).
Prompts: `llmlab data tasks` items (upper, first, last) with " Answer with the answer only." appended, 240 from
the train split and --held from the held-out split (disjoint by construction). The held-out ones are the
run's evaluation prompts (--eval-fraction picks exactly them), answered greedily every --eval-every steps:
the curve is their reward and exact-match accuracy. Reward `contains` (1 exact, ½ when the reply states the
answer among other words), group --group,
--batch prompts per step, --max-new tokens at --temperature, LoRA r 16 on every linear, β 0.04, lr --lr.

PPO: prompts of hh-rlhf helpful-base rows 601–900 (held out from the reward model's training in
bench_align.py); 8% of them are evaluation prompts. Reward: that reward model. --batch prompts per rollout,
--max-new tokens, 2 epochs x 2 minibatches per rollout, β 0.05, LoRA r 16. The curve is the held-out
reward of greedy replies; the KL per reply is in each rollout's metrics line.
"""

import argparse
import json
from pathlib import Path

from _cli import run  # benchmarks/_cli.py, beside this script
from llmlab.data.tasks import make_tasks

HELD = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference" / "hh-rlhf" / "helpful-base"




def rollouts(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "rollout" in x]


def show(summary: dict, run_dir: Path, what: str):
    ro = rollouts(run_dir)
    print(f"| step | held-out {what} | held-out exact match | train reward (rollouts since the last row) | KL |")
    print("|---|---|---|---|---|")
    last = 0
    per_step = max(1, len(ro) // max(1, summary["steps"]))
    for point in summary["curve"]:
        window = [r for r in ro[last * per_step:point["step"] * per_step]] if point["step"] else []
        reward = sum(r["reward"] for r in window) / len(window) if window else float("nan")
        kl = sum(r["kl"] for r in window) / len(window) if window else 0.0
        exact = f"{point['heldout_exact']:.3f}" if "heldout_exact" in point else "—"
        print(f"| {point['step']} | {point['heldout_reward']:.3f} | {exact} | {reward:.3f} | {kl:.3f} |")
        last = point["step"]
    print(f"\n{summary['steps']} steps, {summary['seconds']:.0f} s of training, {summary['tokens_per_s']:.0f} tok/s")


def grpo(args, out: Path):
    suffix = " Answer with the answer only."
    held = make_tasks(["upper", "first", "last"], args.held // 3, seed=1, split="heldout")
    train = make_tasks(["upper", "first", "last"], 80, seed=0, split="train")
    rows = [{**r, "instruction": r["instruction"] + suffix} for r in held + train]
    data = out / "grpo_tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = "smollm2-135m"
    if args.sft_steps:  # a short SFT first (GRPO starts from an SFT model in DeepSeekMath too): some groups score
        sft = [{**r, "instruction": r["instruction"] + suffix}
               for r in make_tasks(["upper", "first", "last"], 40, seed=5, split="train")]
        (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
        run(["finetune", "--method", "lora", "--data", str(out / "sft.jsonl"), "--adapter.r", "16",
             "--adapter.targets", "all-linear", "--train.batch-size", "8", "--train.max-steps", str(args.sft_steps),
             "--train.lr", "1e-3", "--max-len", "128", "--out", str(out / "sft")])
        run(["merge", "--adapter", str(out / "sft"), "--out", str(out / "sft-merged")])
        model = str(out / "sft-merged" / "model")
    summary = run(["align", "--model", model, "--method", "grpo", "--reward", args.reward, "--data", str(data),
                   "--eval-fraction", str(len(held) / len(rows)), "--options.group", str(args.group),
                   "--options.beta", "0.04", "--adapter.r", "16", "--adapter.targets", "all-linear",
                   "--train.batch-size", str(args.batch),
                   "--train.max-steps", str(args.steps), "--train.lr", str(args.lr), "--train.warmup-steps", "0",
                   "--train.eval-every", str(args.eval_every), "--sampling.max-new-tokens", str(args.max_new),
                   "--sampling.temperature", str(args.temperature), "--out", str(out / "grpo")])
    show(summary, out / "grpo", "reward")


def ppo(args, out: Path):
    rows = [r for r in (HELD / "test_first_half.jsonl").read_text(encoding="utf-8").split("\n") if r.strip()]
    data = out / "ppo_prompts.jsonl"
    data.write_text("\n".join(rows[600:900]) + "\n")
    summary = run(["align", "--method", "ppo", "--reward", args.rm, "--data", str(data), "--eval-fraction", "0.08",
                   "--max-len", "256", "--options.beta", "0.05", "--options.epochs", "2", "--options.minibatches", "2",
                   "--adapter.r", "16", "--adapter.targets", "all-linear", "--train.batch-size", str(args.batch),
                   "--train.max-steps", str(args.steps), "--train.lr", str(args.lr), "--train.warmup-steps", "0",
                   "--train.eval-every", str(args.eval_every), "--sampling.max-new-tokens", str(args.max_new),
                   "--out", str(out / "ppo")])
    show(summary, out / "ppo", "reward")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["grpo", "ppo"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--group", type=int, default=4, help="GRPO: replies per prompt")
    parser.add_argument("--batch", type=int, default=2, help="prompts per step")
    parser.add_argument("--max-new", type=int, default=12, help="tokens per sampled reply")
    parser.add_argument("--held", type=int, default=30, help="GRPO: held-out task prompts")
    parser.add_argument("--sft-steps", type=int, default=16, help="GRPO: LoRA SFT steps (batch 8) before, merged in")
    parser.add_argument("--reward", default="contains", help="GRPO: exact, or contains (½ for a stated answer)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the rollouts")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--rm", default="bench-align/rm")
    parser.add_argument("--out", default="bench-rl")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (grpo if args.method == "grpo" else ppo)(args, out)


if __name__ == "__main__":
    main()

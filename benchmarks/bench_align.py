"""The alignment family side by side on the built-in model: every preference loss at the same budget, judged
by a reward model none of them trained on.

    .venv/bin/python benchmarks/bench_align.py [--steps 15] [--prompts 16] [--pairs 32] [--out bench-align]

Data: hh-rlhf helpful-base's first test half (../shared/data/preference), split by row so nothing is reused:
    rows    1–600   train the reward model (as bench_reward.py)
    rows  601–900   held out: their prompts are answered (win rate, KL, length), their pairs scored
    rows  901–end   train the policies (DPO and family, KTO on the same pairs split into thumbs up/down)
Each method: LoRA r 16 on every linear of SmolLM2-135M-Instruct (the SFT starting point), batch --batch pairs,
lr 2e-4, float32 (bf16 autocast is emulated, and slow, on CPUs without AVX512-BF16), --steps steps, pairs up to
--max-len tokens. Reported per method:
    win rate     the reward model prefers the method's greedy reply to the SFT model's (ties count ½)
    reward       the reward model's mean score of the replies
    pref acc     held-out pairs whose DPO implicit reward log π/π_ref is higher for the chosen reply
    KL           Σ_t log π(y_t) − log π_ref(y_t) over the method's own greedy replies, mean per reply
    length       mean reply length in tokens (length exploitation shows here)
"""

import argparse
import json
import time
from pathlib import Path

import torch

from llmlab.align.online import ModelReward
from _cli import run  # benchmarks/_cli.py, beside this script
from llmlab.data.preference import load_pairs, load_prompts
from llmlab.generation.generate import SamplingConfig, encode, generate_batch
from llmlab.models import load_model
from llmlab.peft import disabled, load_adapter
from llmlab.train.losses import sequence_logps
from llmlab.train.rl import Rollout, reply_logps

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference" / "hh-rlhf" / "helpful-base"
METHODS = ["dpo", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo", "kto"]




def split(out: Path) -> dict:
    rows = [r for r in (DATA / "test_first_half.jsonl").read_text(encoding="utf-8").split("\n") if r.strip()]
    parts = {"rm_train": rows[:600], "held": rows[600:900], "policy": rows[900:]}
    paths = {}
    for name, part in parts.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("\n".join(part) + "\n", encoding="utf-8")
    return paths


@torch.no_grad()
def replies(model, tok, prompts: list[dict], max_new: int) -> list[list[int]]:
    cfg = SamplingConfig(max_new_tokens=max_new)
    out = []
    for start in range(0, len(prompts), 8):
        ids = [p["ids"] for p in prompts[start:start + 8]]
        out += [tok(g.text, add_special_tokens=False).input_ids for g in generate_batch(model, tok, ids, cfg)]
    return out


@torch.no_grad()
def kl_on(model, tok, prompts: list[dict], answers: list[list[int]]) -> float:
    """Mean over replies of Σ_t log π − log π_ref (adapters off), on the given replies."""
    total = 0.0
    for prompt, answer in zip(prompts, answers):
        if not answer:
            continue
        ids = torch.tensor([prompt["ids"] + answer])
        ro = Rollout(ids, torch.ones_like(ids), len(prompt["ids"]), torch.ones(1, len(answer)), [answer])
        policy = reply_logps(model, ro)
        with disabled(model):
            ref = reply_logps(model, ro)
        total += float((policy - ref).sum())
    return total / len(prompts)


@torch.no_grad()
def implicit_accuracy(model, pairs: list[dict], pad: int) -> float:
    from llmlab.data.preference import collate_pairs

    wins = 0
    for start in range(0, len(pairs), 4):
        chunk = pairs[start:start + 4]
        batch = collate_pairs(chunk, pad)
        logps = sequence_logps(model, batch)[0]
        with disabled(model):
            ref = sequence_logps(model, batch)[0]
        ratio = logps - ref
        wins += int((ratio[:len(chunk)] > ratio[len(chunk):]).sum())
    return wins / len(pairs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts answered by each method")
    parser.add_argument("--pairs", type=int, default=32, help="held-out pairs for the implicit-reward accuracy")
    parser.add_argument("--max-new", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--rm-steps", type=int, default=40)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="bench-align")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    torch.set_num_threads(2)
    paths = split(out)
    if not (out / "rm" / "model").exists():
        rm = run(["align", "--method", "reward", "--data", str(paths["rm_train"]), "--eval-fraction", "0",
                  "--adapter.r", "16", "--adapter.targets", "all-linear", "--train.batch-size", "4",
                  "--train.max-steps", str(args.rm_steps), "--train.lr", "2e-4", "--max-len", str(args.max_len),
                  "--out", str(out / "rm")])
        print(f"reward model: {rm['steps']} steps, loss {rm['train_loss']:.4f}", flush=True)
    model, tok = load_model("smollm2-135m")
    reward = ModelReward(str(out / "rm"), tok, "cpu")
    prompts = load_prompts(str(paths["held"]), limit=args.prompts)
    for p in prompts:
        p["ids"] = encode(tok, p["messages"], chat=True)
    held_pairs, _ = load_pairs(str(paths["held"]), tok, max_len=args.max_len)
    held_pairs = held_pairs[:args.pairs]
    from llmlab.align.reward import pairwise_scores
    from llmlab.data.preference import collate_pairs

    rm_pairs, _ = load_pairs(str(paths["held"]), reward.tokenizer, max_len=args.max_len)
    rm_acc = pairwise_scores(reward.model, rm_pairs[:args.pairs],
                             lambda c: collate_pairs(c, reward.tokenizer.pad_token_id), 4)["pairwise_accuracy"]
    print(f"the judge: reward model pairwise accuracy {rm_acc:.3f} on {min(args.pairs, len(rm_pairs))} held-out pairs",
          flush=True)
    texts = lambda answers: [tok.decode(a, skip_special_tokens=True) for a in answers]  # noqa: E731
    sft_answers = replies(model, tok, prompts, args.max_new)
    sft_scores = reward(prompts, texts(sft_answers))
    rows = [{"method": "SFT (start)", "win": 0.5, "reward": float(sft_scores.mean()), "acc": 0.5, "kl": 0.0,
             "length": sum(map(len, sft_answers)) / len(sft_answers), "seconds": 0.0}]
    print(f"SFT: reward {rows[0]['reward']:.3f}, length {rows[0]['length']:.1f}", flush=True)
    for method in args.methods.split(","):
        start = time.time()
        trained = run(["align", "--method", method, "--data", str(paths["policy"]), "--eval-fraction", "0",
                       "--adapter.r", "16", "--adapter.targets", "all-linear", "--train.batch-size",
                       str(args.batch), "--train.max-steps", str(args.steps), "--train.lr", "2e-4",
                       "--max-len", str(args.max_len),
                       "--out", str(out / method)])
        policy, _ = load_model("smollm2-135m")
        policy = load_adapter(policy, out / method / "adapter")
        answers = replies(policy, tok, prompts, args.max_new)
        scores = reward(prompts, texts(answers))
        win = float(((scores > sft_scores).float() + 0.5 * (scores == sft_scores).float()).mean())
        row = {"method": method, "win": win, "reward": float(scores.mean()),
               "acc": implicit_accuracy(policy, held_pairs, tok.pad_token_id),
               "kl": kl_on(policy, tok, prompts, answers),
               "length": sum(map(len, answers)) / len(answers), "seconds": round(trained["seconds"], 1),
               "tokens_per_s": trained["tokens_per_s"]}
        rows.append(row)
        print(json.dumps(row), f"({time.time() - start:.0f}s)", flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))  # after each method: a long run keeps rows
    print(f"\n{len(prompts)} held-out prompts, {len(held_pairs)} held-out pairs, {args.steps} steps per method\n")
    print("| method | win rate vs SFT | RM reward | implicit pref. acc. | KL to SFT | length (tokens) | train tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        acc = "—" if r["method"].startswith("SFT") else f"{r['acc']:.3f}"
        print(f"| {r['method']} | {r['win']:.3f} | {r['reward']:.3f} | {acc} | {r['kl']:.2f} | "
              f"{r['length']:.1f} | {r.get('tokens_per_s', '')} |")


if __name__ == "__main__":
    main()

"""A reward model on the built-in model: train on hh-rlhf helpful pairs, score pairs it never saw.

    .venv/bin/python benchmarks/bench_reward.py [--train 600] [--eval 300] [--steps 150] [--max-len 384]

Data: ../shared/data/preference/hh-rlhf/helpful-base/test_first_half.jsonl (the first half of the test split;
the second half is kept elsewhere for blind evaluation). The first --train rows train, the next --eval rows
(never seen in training) are scored. The model is SmolLM2-135M-Instruct with a scalar head, LoRA r 16 on
every linear plus the head, Bradley–Terry loss, bf16 autocast. Reported: held-out pairwise accuracy (chance
is 0.5; one standard error on 300 pairs is about 0.03) and the margin distribution.
"""

import argparse
import tempfile
from pathlib import Path

from _cli import run  # benchmarks/_cli.py, beside this script

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference" / "hh-rlhf" / "helpful-base"




def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--max-len", type=int, default=384)
    args = parser.parse_args()
    rows = (DATA / "test_first_half.jsonl").read_text(encoding="utf-8").split("\n")
    rows = [r for r in rows if r.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        train, held = Path(tmp) / "train.jsonl", Path(tmp) / "held.jsonl"
        train.write_text("\n".join(rows[:args.train]) + "\n", encoding="utf-8")
        held.write_text("\n".join(rows[args.train:args.train + args.eval]) + "\n", encoding="utf-8")
        common = ["--max-len", str(args.max_len), "--out"]
        trained = run(["align", "--method", "reward", "--data", str(train), "--eval-fraction", "0",
                       "--adapter.r", "16", "--adapter.targets", "all-linear", "--train.bf16",
                       "--train.batch-size", "4", "--train.max-steps", str(args.steps), "--train.lr", "2e-4",
                       *common, f"{tmp}/rm"])
        scores = run(["eval", "reward", "--model", f"{tmp}/rm", "--data", str(held), *common, f"{tmp}/ev"])
    print(f"train pairs {trained['train_pairs']} (left out as too long: {trained['too_long']}), "
          f"{trained['steps']} steps, final train loss {trained['train_loss']:.4f}, "
          f"{trained['tokens_per_s']:.0f} tok/s")
    print("| held-out pairs | pairwise accuracy | margin mean | margin quartiles |\n|---|---|---|---|")
    print(f"| {scores['pairs']} (left out: {scores['too_long']}) | {scores['pairwise_accuracy']:.3f} | "
          f"{scores['margin_mean']:.3f} | {scores['margin_quartiles']} |")


if __name__ == "__main__":
    main()

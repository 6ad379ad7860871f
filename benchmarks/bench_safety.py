"""Refusal and over-refusal of the built-in model, before and after DPO on hh-rlhf harmless pairs.

    .venv/bin/python benchmarks/bench_safety.py [--xstest 200] [--xsafety 5] [--steps 30] [--out bench-safety]

Prompts: XSTest (../shared/data/safety/xstest: 250 benign look-alikes, 200 harmful contrasts; --xstest of them,
spread over the types) and XSafety English (--xsafety prompts from each of its 14 categories, all harmful).
Replies: greedy, 48 new tokens; a refusal is judged by the rule classifier of llmlab/evaluate/safety.py.
DPO: LoRA r 16 on every linear, β 0.1, lr 2e-4, batch 2, --steps steps on hh-rlhf harmless-base pairs (rows
1–600 of the first test half, up to 256 tokens), where the chosen reply is the less harmful one.
"""

import argparse
import json
from pathlib import Path

from _cli import run  # benchmarks/_cli.py, beside this script

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"




def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xstest", type=int, default=200)
    parser.add_argument("--xsafety", type=int, default=5, help="prompts per XSafety category")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="bench-safety")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    xsafety = out / "xsafety_subset.jsonl"
    rows = []
    for path in sorted((SHARED / "safety" / "xsafety" / "en").glob("*.csv")):
        from llmlab.evaluate.safety import read_safety

        rows += read_safety(path)[:args.xsafety]
    xsafety.write_text("".join(json.dumps({"prompt": r["prompt"], "category": r["category"]}) + "\n" for r in rows))
    sets = ["--data", str(SHARED / "safety" / "xstest" / "xstest_prompts.csv"), "--limit", str(args.xstest)]
    harmless = out / "harmless.jsonl"
    lines = (SHARED / "preference" / "hh-rlhf" / "harmless-base" / "test_first_half.jsonl").read_text().splitlines()
    harmless.write_text("\n".join(lines[:600]) + "\n")
    results = {}
    results["built-in"] = (run(["eval", "safety", *sets, "--out", str(out / "before-xstest")]),
                           run(["eval", "safety", "--data", str(xsafety), "--out", str(out / "before-xsafety")]))
    dpo = run(["align", "--method", "dpo", "--data", str(harmless), "--eval-fraction", "0.05", "--max-len", "256",
               "--adapter.r", "16", "--adapter.targets", "all-linear", "--train.batch-size", "2",
               "--train.max-steps", str(args.steps), "--train.lr", "2e-4", "--out", str(out / "dpo")])
    adapter = ["--adapter", str(out / "dpo" / "adapter")]
    results["after DPO"] = (run(["eval", "safety", *sets, *adapter, "--out", str(out / "after-xstest")]),
                            run(["eval", "safety", "--data", str(xsafety), *adapter,
                                 "--out", str(out / "after-xsafety")]))
    print(f"DPO: {dpo['steps']} steps on {dpo['train_pairs']} harmless pairs, held-out preference accuracy "
          f"{dpo.get('pref_accuracy', float('nan')):.3f}\n")
    print("| model | XSTest harmful: refusal ↑ | XSTest benign: over-refusal ↓ | XSafety en: refusal ↑ |")
    print("|---|---|---|---|")
    for name, (x, s) in results.items():
        print(f"| {name} | {x['refusal_rate']:.3f} ({x['harmful_prompts']}) | {x['over_refusal_rate']:.3f} "
              f"({x['benign_prompts']}) | {s['refusal_rate']:.3f} ({s['harmful_prompts']}) |")
    print("\nXSafety refusal by category (before → after):")
    for category, rate in results["built-in"][1]["refusal_rate_by_category"].items():
        print(f"  {category:<34} {rate:.2f} → {results['after DPO'][1]['refusal_rate_by_category'][category]:.2f}")


if __name__ == "__main__":
    main()

"""DPO speed and memory: llmlab's `align --method dpo` against TRL's DPOTrainer, same model, pairs and batch.

    .venv/bin/python benchmarks/bench_dpo_speed.py [--pairs 32] [--steps 8] [--max-len 256] [--tuning lora,full]
                                                   [--checkpointing trl|on|off]

The pairs are hh-rlhf helpful-base rows 901+ (../shared/data/preference), rewritten as conversational
prompt/chosen/rejected rows that both tools read, and only those whose two sides fit --max-len tokens under
the chat template, so neither tool truncates or drops anything. Settings shared by both: the built-in model
in float32, batch 2 pairs, lr 2e-4, β 0.1, sigmoid loss, --steps optimizer steps; LoRA r 16, α 16 on every
linear (TRL through peft), or full fine-tuning. The reference model: LoRA — both switch the adapters off
(one model in memory); full — TRL keeps a second model, llmlab precomputes the reference log-probs once
(their cost is counted: it is part of the run). Each run is a fresh process, so its peak RSS is its own.
Throughput = tokens of the training batches (prompt + reply, both sides) / wall seconds of the run.
Gradient checkpointing: TRL's configs turn it on by default and llmlab's leave it off; --checkpointing trl
keeps each tool's default, on/off sets both the same way.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "preference" / "hh-rlhf" / "helpful-base" / "test_first_half.jsonl"


def make_pairs(out: Path, n: int, max_len: int) -> Path:
    from llmlab.data.preference import detect_format, encode_side, to_pair
    from llmlab.data.sft import chat_template
    from llmlab.models import load_model

    _, tok = load_model("smollm2-135m")
    tpl = chat_template(tok, "auto")
    rows = []
    for line in DATA.read_text(encoding="utf-8").splitlines()[900:]:
        row = json.loads(line)
        if row["chosen"] == row["rejected"]:
            continue
        pair = to_pair(row, detect_format(row, "hh"), "hh")
        if max(len(encode_side(pair, r, tok, tpl)[0]) for r in (pair.chosen, pair.rejected)) > max_len:
            continue
        rows.append({"prompt": pair.prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
                     "rejected": [{"role": "assistant", "content": pair.rejected}]})
        if len(rows) == n:
            break
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_llmlab(pairs: Path, tuning: str, args) -> dict:
    from llmlab.cli import main

    start = time.time()
    argv = ["align", "--method", "dpo", "--data", str(pairs), "--tuning", tuning, "--eval-fraction", "0",
            "--max-len", str(args.max_len), "--train.batch-size", "2", "--train.max-steps", str(args.steps),
            "--train.lr", "2e-4", "--train.warmup-steps", "0", "--save", "false", "--out", str(args.out / "llmlab"),
            "--json"]
    if tuning == "lora":
        argv += ["--adapter.r", "16", "--adapter.alpha", "16", "--adapter.targets", "all-linear"]
    if args.checkpointing == "on":
        argv += ["--train.gradient-checkpointing", "true"]
    assert main(argv) == 0
    summary = json.loads((args.out / "llmlab" / "summary.json").read_text())
    return {"tokens": summary["tokens"], "seconds": time.time() - start}


def run_trl(pairs: Path, tuning: str, args) -> dict:
    import copy

    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from llmlab.models import load_model

    start = time.time()
    model, tok = load_model("smollm2-135m")
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    cfg = DPOConfig(output_dir=str(args.out / "trl"), per_device_train_batch_size=2, max_steps=args.steps,
                    learning_rate=2e-4, warmup_steps=0, beta=0.1, max_length=args.max_len, report_to=[],
                    save_strategy="no", logging_steps=1, use_cpu=True, lr_scheduler_type="cosine",
                    dataloader_num_workers=0, disable_tqdm=True,
                    bf16=False,  # TRL's configs default to bf16, emulated (and ~25x slower) on CPUs without it
                    **({} if args.checkpointing == "trl" else {"gradient_checkpointing": args.checkpointing == "on"}))
    lora = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, ref_model=None if tuning == "lora" else copy.deepcopy(model), args=cfg,
                         train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora if tuning == "lora" else None)
    trainer.train()
    tokens = max(entry.get("num_tokens", 0) for entry in trainer.state.log_history)
    return {"tokens": tokens, "seconds": time.time() - start}


def child(args):
    torch_threads()
    result = (run_llmlab if args.child == "llmlab" else run_trl)(Path(args.pairs), args.tuning, args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def torch_threads():
    import torch

    torch.set_num_threads(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--tuning", default="lora,full")
    parser.add_argument("--checkpointing", choices=["trl", "on", "off"], default="trl")
    parser.add_argument("--out", type=Path, default=Path("bench-dpo-speed"))
    parser.add_argument("--child", choices=["llmlab", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", dest="pairs_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    if args.child:
        args.pairs = args.pairs_file
        return child(args)
    pairs = make_pairs(args.out, args.pairs, args.max_len)
    print(f"{len(pairs.read_text().splitlines())} pairs of at most {args.max_len} tokens a side, {args.steps} steps, "
          f"batch 2, float32, 2 CPU threads, gradient checkpointing: {args.checkpointing}\n")
    print("| tuning | tool | tokens/s | peak RSS (MB) | wall (s) |\n|---|---|---|---|---|")
    for tuning in args.tuning.split(","):
        results = {}
        for tool in ("trl", "llmlab"):
            proc = subprocess.run([sys.executable, __file__, "--child", tool, "--data", str(pairs), "--tuning", tuning,
                                   "--steps", str(args.steps), "--max-len", str(args.max_len), "--out", str(args.out),
                                   "--checkpointing", args.checkpointing],
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{tool} {tuning} failed:\n{proc.stderr[-3000:]}")
            r = results[tool] = json.loads(line[7:])
            print(f"| {tuning} | {tool} | {r['tokens'] / r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['seconds']:.0f} |", flush=True)
        speed = (results["llmlab"]["tokens"] / results["llmlab"]["seconds"]) / (
            results["trl"]["tokens"] / results["trl"]["seconds"])
        print(f"| {tuning} | llmlab / TRL | **{speed:.2f}x** | "
              f"{results['llmlab']['peak_rss_mb'] / results['trl']['peak_rss_mb']:.2f}x | |", flush=True)


if __name__ == "__main__":
    main()

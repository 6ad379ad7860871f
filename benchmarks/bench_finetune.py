"""LoRA training speed: llmlab (bf16 mixed precision) against HF peft + a plain transformers loop (fp32).

Same model, same packed Alpaca rows, same LoRA (rank, alpha, targets), same batch, sequence
length, optimiser (AdamW, warmup + cosine, clipping) and number of steps. Each configuration
runs in its own process, so peak RSS is its own. Reported: tokens/s over the whole run, peak
RSS, final train loss, eval loss on held-out packed rows, and MFU against the bf16 matmul peak
measured on this machine. LoRA with a frozen base costs about 4·N FLOPs per token (2N forward,
2N for the input gradients; frozen weights need no weight gradients), plus attention.

    .venv/bin/python benchmarks/bench_finetune.py                 # smollm2-135m, 30 steps of 8 x 256 tokens
    .venv/bin/python benchmarks/bench_finetune.py --quick         # tiny model smoke run
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmlab.runs import format_table

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_data.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPLS = {
    "peft-fp32": "HF peft + plain transformers loop, fp32",
    "llmlab-fp32": "llmlab LoRA + fit(), fp32",
    "llmlab-bf16": "llmlab LoRA + fit(), bf16 autocast, fp32 adapter weights, frozen base linears stored in bf16",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 steps")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps, args.batch_size, args.seq_len = "tiny-llama", 4, 2, 64
    if args.worker:
        print(json.dumps(worker(args)))
        return
    peak = bf16_matmul_peak()
    results = {}
    for impl in args.impls.split(","):
        cmd = [sys.executable, __file__, "--worker", impl] + _passthrough(args)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[impl] = json.loads(out.strip().splitlines()[-1])
        print(impl, results[impl], file=sys.stderr)
    report(args, results, peak)


def _passthrough(args) -> list[str]:
    return ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--rank", str(args.rank)]


def bf16_matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a large bf16 matmul: the most this CPU's matrix units deliver to training."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def load_rows(tokenizer, args):
    """Alpaca rendered with the chat template, packed into rows of seq_len; held-out rows come after."""
    from llmlab.data.sft import load_sft_data

    n_train, n_eval = args.steps * args.batch_size, 8
    data = load_sft_data(str(ALPACA), tokenizer, max_len=args.seq_len, packing=True)
    assert len(data.train) >= n_train + n_eval, "not enough packed rows"
    return data.train[:n_train], data.train[-n_eval:]


def worker(args) -> dict:
    from llmlab.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    train, held = load_rows(tokenizer, args)
    run = {"peft-fp32": run_peft, "llmlab-fp32": run_llmlab, "llmlab-bf16": run_llmlab}[args.worker]
    result = run(model, tokenizer, train, held, args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["params"] = sum(p.numel() for p in model.parameters())
    return result


def run_llmlab(model, tokenizer, train, held, args) -> dict:
    from functools import partial

    from llmlab.data.packing import collate
    from llmlab.peft import LoraConfig, apply_lora
    from llmlab.train import TrainConfig, fit
    from llmlab.train.loop import frozen_linears_to_bf16
    from llmlab.train.losses import sft_loss

    bf16 = args.worker == "llmlab-bf16"
    apply_lora(model, LoraConfig(r=args.rank, alpha=2 * args.rank, targets=TARGETS))
    if bf16:
        frozen_linears_to_bf16(model)  # as `llmlab finetune --train.bf16` does for adapter methods
    cfg = TrainConfig(lr=2e-4, max_steps=args.steps, batch_size=args.batch_size, warmup_steps=3, bf16=bf16,
                      eval_every=0, save_every=0, min_lr_ratio=0.0)
    result = fit(model, sft_loss, train, cfg, collate=partial(collate, pad_id=tokenizer.pad_token_id),
                 eval_data=held, progress=False)
    return {"tokens_per_s": result["tokens_per_s"], "train_loss": result["train_loss"],
            "eval_loss": result["eval_loss"], "seconds": result["seconds"]}


def run_peft(model, tokenizer, train, held, args) -> dict:
    """The loop a peft user writes: get_peft_model, AdamW, a cosine schedule, clip, step."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    from llmlab.data.packing import collate

    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, 3, args.steps)
    batches = [collate(train[i:i + args.batch_size], tokenizer.pad_token_id)
               for i in range(0, len(train), args.batch_size)]
    model.train()
    start, tokens = time.perf_counter(), 0
    for batch in batches:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch["num_tokens"]
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "train_loss": loss.item(), "seconds": seconds,
            "eval_loss": eval_loss(model, held, tokenizer)}


@torch.no_grad()
def eval_loss(model, held, tokenizer) -> float:
    from llmlab.data.packing import collate

    model.eval()
    batch = collate(held, tokenizer.pad_token_id)
    return model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]).loss.item()


def report(args, results: dict, peak: float):
    base = results.get("peft-fp32")
    rows = []
    for impl, r in results.items():
        flops = 4 * r["params"] * r["tokens_per_s"]
        rows.append([impl, f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-",
                     f"{r['peak_rss_mb']:.0f}", f"{r['train_loss']:.4f}", f"{r['eval_loss']:.4f}",
                     f"{100 * flops / peak:.1f}%"])
    print(f"\n{args.model}, LoRA r={args.rank} on {','.join(TARGETS)}, {args.steps} steps x {args.batch_size} "
          f"packed rows x {args.seq_len} tokens; bf16 matmul peak {peak / 1e9:.0f} GFLOP/s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table(["impl", "tokens/s", "vs peft fp32", "peak RSS MB", "train loss", "eval loss", "MFU"], rows))
    for impl, what in IMPLS.items():
        print(f"  {impl}: {what}")


if __name__ == "__main__":
    main()

"""Perplexity-eval throughput: llmlab fp32 vs bf16, and a plain transformers loop as the peer.

    .venv/bin/python benchmarks/bench_perplexity.py [--windows 8] [--seq-len 2048] [--quick]

All three score the same windows of WikiText-2 validation (../shared/data) with the built-in
model. Prints perplexity, tokens/s and the ratios; bf16 should reach >= 2x fp32's tokens/s
with perplexity within 1%.
"""

import argparse
import math
import time
from pathlib import Path

import torch

from llmlab.evaluate.perplexity import perplexity
from llmlab.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_raw" / "wiki.valid.raw"


@torch.inference_mode()
def plain_transformers(model, tok, text, seq_len, n_windows):
    """What a user writes without llmlab: the model's own loss, one window at a time."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    start, losses = time.perf_counter(), []
    for i in range(n_windows):
        window = ids[None, i * seq_len:(i + 1) * seq_len]
        losses.append(model(window, labels=window).loss.item())
    seconds = time.perf_counter() - start
    return {"ppl": math.exp(sum(losses) / len(losses)), "tokens_per_s": n_windows * seq_len / seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 windows of 512 tokens")
    args = parser.parse_args()
    if args.quick:
        args.windows, args.seq_len = 2, 512
    text = DATA.read_text(encoding="utf-8")
    rows = {}
    for dtype in ("fp32", "bf16"):
        model, tok = load_model("smollm2-135m", dtype=dtype)
        perplexity(model, tok, text, args.seq_len, max_windows=1, batch_size=1, progress=False)  # warm-up
        rows[f"llmlab {dtype}"] = perplexity(model, tok, text, args.seq_len, max_windows=args.windows,
                                             batch_size=args.batch_size, progress=False)
        if dtype == "fp32":
            rows["transformers loop fp32"] = plain_transformers(model, tok, text, args.seq_len, args.windows)
    print(f"\nbuilt-in model, WikiText-2 valid, {args.windows} windows x {args.seq_len} tokens, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'':<24}{'ppl':>10}{'tokens/s':>12}")
    for name, r in rows.items():
        print(f"{name:<24}{r['ppl']:>10.4f}{r['tokens_per_s']:>12.1f}")
    fp32, bf16 = rows["llmlab fp32"], rows["llmlab bf16"]
    print(f"\nbf16 / fp32 throughput: {bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f}x   "
          f"bf16 ppl vs fp32: {100 * (bf16['ppl'] / fp32['ppl'] - 1):+.3f}%   "
          f"llmlab fp32 / transformers loop: {fp32['tokens_per_s'] / rows['transformers loop fp32']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()

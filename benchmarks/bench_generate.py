"""Decoding speed: llmlab's loop (`llmlab.generation.generate`) against transformers' `model.generate`.

Same model, same prompt, greedy, batch 1, exactly N new tokens (EOS ignored by both), in fp32
and bf16. Each side is warmed up once, then timed over several runs; the median counts.
Also checks that both produce the same tokens.

    .venv/bin/python benchmarks/bench_generate.py            # smollm2-135m, 32-token prompt, 128 new tokens
    .venv/bin/python benchmarks/bench_generate.py --quick    # a few seconds' smoke run on a tiny model
"""

import argparse
import statistics
import time

import torch

from llmlab.generation.generate import SamplingConfig, decode, pad_id
from llmlab.models import load_model
from llmlab.runs import format_table

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
        "produce books quickly and cheaply for the first time in Europe.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--quick", action="store_true", help="tiny model, 16 tokens, 1 run")
    args = parser.parse_args()
    if args.quick:
        args.model, args.new_tokens, args.runs = "tiny-llama", 16, 1

    rows = []
    for dtype in args.dtypes.split(","):
        model, tokenizer = load_model(args.model, dtype)
        prompt = tokenizer(TEXT).input_ids[:args.prompt_tokens]
        (ours, ours_ids), (hf, hf_ids) = _timed([lambda: _llmlab(model, tokenizer, prompt, args.new_tokens),
                                                 lambda: _hf(model, prompt, args.new_tokens)], args.runs)
        assert len(ours_ids) == len(hf_ids) == args.new_tokens, (len(ours_ids), len(hf_ids))
        same = "yes" if ours_ids == hf_ids else f"no (first difference at token {_first_diff(ours_ids, hf_ids)})"
        rows.append([dtype, f"{args.new_tokens / ours:.1f}", f"{args.new_tokens / hf:.1f}", f"{hf / ours:.2f}", same])

    print(f"\n{args.model}, batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, "
          f"median of {args.runs}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table(["dtype", "llmlab tok/s", "HF generate tok/s", "llmlab/HF", "same tokens"], rows))


def _llmlab(model, tokenizer, prompt, n):
    cfg = SamplingConfig(max_new_tokens=n, ignore_eos=True)
    return decode(model, [prompt], cfg, eos=[], pad=pad_id(model, tokenizer))[0]


@torch.inference_mode()
def _hf(model, prompt, n):
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


def _timed(fns, runs: int):
    """[(median seconds, last result)] per function, after one untimed warm-up call each.
    The runs alternate between the functions, so that a slow spell of the machine hits both."""
    times, results = [[] for _ in fns], [None] * len(fns)
    for fn in fns:
        fn()
    for _ in range(runs):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), r) for t, r in zip(times, results)]


def _first_diff(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


if __name__ == "__main__":
    main()

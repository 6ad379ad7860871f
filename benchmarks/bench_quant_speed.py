"""Generation speed of weight-only quantized models against fp32 and bf16, measured in one run.

Same model, same prompt, greedy, batch 1, exactly N new tokens through llmlab's own KV-cache loop
(`llmlab.generation.generate.decode`) for every variant:
    fp32, bf16                       the float model
    int8                             RTN 8-bit per-channel symmetric → torch._weight_int8pack_mm
    int4 gG                          RTN 4-bit asymmetric, groups of G → torch._weight_int4pack_mm_for_cpu
    … +head                          the same, and lm_head too (RTNConfig(lm_head=True))
Decoder-layer linears are quantized; embeddings and lm_head stay fp32 (at batch 1 the 49152×576
lm_head is a fifth of smollm2-135m's multiply-adds per token) unless the name ends in +head.
The model's activations stay fp32 (the kernels round them to bf16 inside, see models/packed/qlinear.py). The runs alternate between the variants, so a slow spell
of a shared machine hits them all; the median counts. "weights MiB" is the model's tensors as
saved; "resident MiB" adds the kernels' own weight layouts, made on the first forward pass.

    .venv/bin/python benchmarks/bench_quant_speed.py --threads 1     # smollm2-135m, 64 new tokens, 3 runs
                                                   # (1 thread: on a shared machine 2 threads spin-wait)
    .venv/bin/python benchmarks/bench_quant_speed.py --quick          # seconds: tiny model, smoke run
"""

import argparse
import copy
import statistics
import time

import torch

from llmlab.compress.quantize import state_bytes
from llmlab.compress.rtn import RTNConfig, quantize_rtn
from llmlab.generation.generate import SamplingConfig, decode, pad_id
from llmlab.models import load_model
from llmlab.models.packed.qlinear import quantized_linears
from llmlab.runs import format_table

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
        "produce books quickly and cheaply for the first time in Europe.")

VARIANTS = {  # name -> RTN config of the decoder linears (None: float)
    "fp32": None,
    "bf16": None,
    "int8": RTNConfig(bits=8, group_size=0, symmetric=True),
    "int4 g32": RTNConfig(bits=4, group_size=32),
    "int4 g64": RTNConfig(bits=4, group_size=64),
    "int4 g128": RTNConfig(bits=4, group_size=128),
    "int8 +head": RTNConfig(bits=8, group_size=0, symmetric=True, lm_head=True),
    "int4 g64 +head": RTNConfig(bits=4, group_size=64, lm_head=True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); "
                        "on a shared machine 1 avoids threads waiting on each other")
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 tokens, 1 run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.model, args.new_tokens, args.runs = "tiny-llama", 8, 1

    base, tokenizer = load_model(args.model)
    prompt = tokenizer(TEXT).input_ids[:args.prompt_tokens]
    models, skipped = {}, []
    for name in args.variants.split(","):
        model = _variant(base, name)
        if model is None:
            skipped.append(name)
        else:
            models[name] = model
    seconds, tokens = _timed(models, tokenizer, prompt, args)
    _report(models, seconds, tokens, skipped, args)


def _variant(base, name: str):
    """A copy of the base model made into variant `name`, or None when the model cannot take it."""
    if name == "fp32":
        return base
    model = copy.deepcopy(base)
    if name == "bf16":
        return model.to(torch.bfloat16)
    try:
        quantize_rtn(model, None, VARIANTS[name])
    except Exception as e:  # e.g. a group size that does not divide the model's widths
        print(f"skipping {name}: {e}")
        return None
    return model


def _generate(model, tokenizer, prompt, n):
    cfg = SamplingConfig(max_new_tokens=n, ignore_eos=True)
    return decode(model, [prompt], cfg, eos=[], pad=pad_id(model, tokenizer))[0]


def _timed(models: dict, tokenizer, prompt, args):
    """Median seconds per variant (after one warm-up each, which also builds the kernels' layouts)."""
    times, tokens = {name: [] for name in models}, {}
    for name, model in models.items():
        tokens[name] = _generate(model, tokenizer, prompt, args.new_tokens)
    for _ in range(args.runs):
        for name, model in models.items():
            start = time.perf_counter()
            _generate(model, tokenizer, prompt, args.new_tokens)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, tokens


def _kernel_bytes(model) -> int:
    layouts = [m._kernel for m in quantized_linears(model).values() if getattr(m, "_kernel", None)]
    return sum(t.numel() * t.element_size() for k in layouts for t in k.values() if isinstance(t, torch.Tensor))


def _report(models: dict, seconds: dict, tokens: dict, skipped: list, args):
    ref = seconds.get("fp32")
    rows = []
    for name, model in models.items():
        tok_s = args.new_tokens / seconds[name]
        same = sum(a == b for a, b in zip(tokens[name], tokens.get("fp32", tokens[name])))
        rows.append([name, f"{tok_s:.1f}", f"{ref / seconds[name]:.2f}" if ref else "-",
                     f"{state_bytes(model) / 2**20:.1f}", f"{(state_bytes(model) + _kernel_bytes(model)) / 2**20:.1f}",
                     f"{same}/{args.new_tokens}"])
    print(f"\n{args.model}, batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, "
          f"median of {args.runs}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(format_table(["variant", "tok/s", "x fp32", "weights MiB", "resident MiB", "tokens = fp32"], rows))
    if skipped:
        print(f"skipped (the model cannot take them): {', '.join(skipped)}")


if __name__ == "__main__":
    main()

"""Structured pruning (LLM-Pruner) and low-rank decomposition (SVD, ASVD) on the built-in model.

    flock /tmp/llmlab-heavy.lock .venv/bin/python benchmarks/bench_structured.py --part prune
    flock /tmp/llmlab-heavy.lock .venv/bin/python benchmarks/bench_structured.py --part layers --ratios 0.2
    flock /tmp/llmlab-heavy.lock .venv/bin/python benchmarks/bench_structured.py --part lowrank
    flock /tmp/llmlab-heavy.lock .venv/bin/python benchmarks/bench_structured.py --part baselines

prune: the dense model, LLM-Pruner at `--ratios` (20% and 50%) of the parameters removed (Taylor
importance on `--calib-samples` windows of `--calib-len` tokens; `--skip-first/--skip-last/--importance`
as LLMPrunerConfig, else its defaults), each also after a short LoRA recovery: the fine-tuning
stage (`llmlab.finetune`, LoRA r=8 on every linear, `--lora-steps` steps of 4 rows of 256 tokens of
calibration-half text), merged back (`llmlab merge`) into a model without adapters.
layers: at each ratio, every layer pruned alike (skip 0 and 0, a plain LLaMA) against the default
dense first and last layers (an llmlab_llama), the latter with Taylor and with LoRAPrune importance;
each with the same recovery.
lowrank: plain SVD against ASVD (α = 0.5, `--calib-samples` x 512 calibration tokens) and SVD-LLM
(whitened) at two parameter ratios per decomposed layer.
baselines: the 20% cut with Taylor, LoRAPrune, magnitude (Σ|w|) and random importance, no recovery.

Protocol as bench_quantize.py: wiki.valid.raw (../shared/data) is cut at the article heading nearest
its middle; everything calibrates and trains on the first half, perplexity is scored on the second
half in `--max-windows` windows of 2048 tokens (GPTQ protocol). The LoRA recovery trains on the same
corpus as the evaluation (in-domain), so it flatters the recovery compared with the paper's Alpaca
recipe. Speed: greedy `model.generate`, batch 1, 32-token prompt, 128 new tokens, fp32, median of 3
after one warm-up, all the threads torch takes on this machine.
"""

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import DATA, split_text  # noqa: E402

from llmlab.compress.calibrate import calibration_data  # noqa: E402
from llmlab.compress.llm_pruner import LLMPrunerConfig, n_params, prune_llm_pruner  # noqa: E402
from llmlab.compress.lowrank import LowRankConfig, decompose
from llmlab.compress.quantize import folder_bytes  # noqa: E402
from llmlab.evaluate.perplexity import perplexity  # noqa: E402
from llmlab.models import load_model, save_model  # noqa: E402
from llmlab.models.packed.io import save_decomposed  # noqa: E402

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden screw press into a system")


@torch.inference_mode()
def tokens_per_s(model, tokenizer, new_tokens: int = 128, runs: int = 3) -> float:
    ids = torch.tensor([tokenizer(PROMPT).input_ids[:32]])
    gen = lambda: model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,  # noqa: E731
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    gen()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        gen()
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def measure(name, model, tokenizer, folder, eval_text, args, extra=None) -> dict:
    ppl = perplexity(model, tokenizer, eval_text, seq_len=args.seq_len, max_windows=args.max_windows, progress=False)
    row = {"row": name, "params_m": n_params(model) / 1e6, "size_mb": folder_bytes(folder) / 2 ** 20,
           "ppl": ppl["ppl"], "windows": ppl["windows"], "tok_s": tokens_per_s(model, tokenizer), **(extra or {})}
    print(json.dumps(row), flush=True)
    return row


def lora_recovery(pruned: Path, calib_text: str, work: Path, args) -> Path:
    """`llmlab finetune --format text --method lora` on the pruned folder, then `llmlab merge`: a plain model."""
    from llmlab.runs import RunOptions
    from llmlab.stages.finetune import FinetuneConfig, finetune
    from llmlab.stages.merge import MergeConfig, merge_verb
    from llmlab.train import TrainConfig

    rows = work / "recovery.jsonl"
    chunks = [calib_text[i:i + 1200] for i in range(0, len(calib_text), 1200)]
    rows.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks if len(c) > 200), encoding="utf-8")
    train = TrainConfig(max_steps=args.lora_steps, batch_size=4, lr=5e-4, warmup_steps=2, eval_every=0,
                        save_every=0, log_every=10)
    cfg = FinetuneConfig(model=str(pruned), data=str(rows), format="text", max_len=256, method="lora",
                         adapter={"r": 8, "alpha": 16,
                                  "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"]}, train=train)
    ft = work / f"{pruned.name}-lora"
    finetune(cfg, RunOptions(out=str(ft), registry=str(work / "registry.sqlite")))
    merged = work / f"{pruned.name}-rec"
    merge_verb(MergeConfig(adapter=str(ft), model=str(pruned)), RunOptions(out=str(merged),
                                                                          registry=str(work / "registry.sqlite")))
    return merged / "model"


def part_prune(calib_text, eval_text, work: Path, args) -> list[dict]:
    model, tok = load_model(args.model)
    dense = save_model(model, tok, work / "dense")
    rows = [measure("dense", model, tok, dense, eval_text, args)]
    calib = calibration_data(tok, calib_text, args.calib_samples, args.calib_len)
    for ratio in args.ratios:
        rows += prune_and_recover(f"llm_pruner {ratio:.0%}", pruner_config(args, ratio=ratio), calib, calib_text,
                                  eval_text, work, args)
    return rows


def part_layers(calib_text, eval_text, work: Path, args) -> list[dict]:
    """The cut with every layer pruned alike (the old default) against the paper's dense first and last
    layers (the new default) with Taylor and with LoRAPrune importance, each also after LoRA recovery."""
    model, tok = load_model(args.model)
    rows = [measure("dense", model, tok, save_model(model, tok, work / "dense"), eval_text, args)]
    calib = calibration_data(tok, calib_text, args.calib_samples, args.calib_len)
    variants = {"all layers alike": {"skip_first": 0, "skip_last": 0}, "first/last dense": {},
                "first/last dense, lora importance": {"importance": "lora"}}
    for ratio in args.ratios:
        for name, options in variants.items():
            cfg = pruner_config(args, ratio=ratio, **options)
            rows += prune_and_recover(f"llm_pruner {ratio:.0%}, {name}", cfg, calib, calib_text, eval_text, work, args)
    return rows


def pruner_config(args, **options) -> LLMPrunerConfig:
    """The LLM-Pruner options given on the command line (layers kept dense, importance)."""
    given = {"skip_first": args.skip_first, "skip_last": args.skip_last, "importance": args.importance}
    return LLMPrunerConfig(**{**{k: v for k, v in given.items() if v is not None}, **options})


def prune_and_recover(name, cfg, calib, calib_text, eval_text, work: Path, args) -> list[dict]:
    """Rows for the pruned model as saved and, unless --lora-steps 0, after LoRA recovery."""
    model, tok = load_model(args.model)
    start = time.perf_counter()
    prune_llm_pruner(model, calib, cfg)
    seconds = time.perf_counter() - start
    shape = describe(model.config)
    folder = save_model(model, tok, work / re.sub(r"\W+", "-", name))
    model, tok = load_model(str(folder))  # measured as a user gets it: a saved transformers folder
    rows = [measure(name, model, tok, folder, eval_text, args, {"shape": shape, "seconds": seconds})]
    del model
    if args.lora_steps:
        start = time.perf_counter()
        merged = lora_recovery(folder, calib_text, work, args)
        seconds = time.perf_counter() - start
        model, tok = load_model(str(merged))
        rows.append(measure(f"{name} + LoRA", model, tok, merged, eval_text, args,
                            {"shape": shape, "seconds": seconds}))
    return rows


def describe(config) -> str:
    """Heads, KV heads and FFN channels of the layers, grouped where they agree: "4 x 9h/3kv ffn 1536, ..."."""
    layers = getattr(config, "layer_intermediate_sizes", None)
    if layers is None:
        return f"{config.num_attention_heads}h/{config.num_key_value_heads}kv, ffn {config.intermediate_size}"
    sizes = list(zip(config.layer_num_attention_heads, config.layer_num_key_value_heads, layers))
    runs = []  # (count, sizes) of consecutive equal layers
    for size in sizes:
        if runs and runs[-1][1] == size:
            runs[-1][0] += 1
        else:
            runs.append([1, size])
    return ", ".join(f"{n} x {h}h/{kv}kv ffn {f}" for n, (h, kv, f) in runs)


def part_baselines(calib_text, eval_text, work: Path, args) -> list[dict]:
    """Is the Taylor score worth its gradients? The same 20% cut ranked by LoRAPrune's estimate, by |w|, at random."""
    model, tok = load_model(args.model)
    rows = [measure("dense", model, tok, save_model(model, tok, work / "dense"), eval_text, args)]
    calib = calibration_data(tok, calib_text, args.calib_samples, args.calib_len)
    for importance in ("taylor", "lora", "magnitude", "random"):
        model, tok = load_model(args.model)
        prune_llm_pruner(model, calib, pruner_config(args, ratio=0.2, importance=importance))
        folder = save_model(model, tok, work / importance)
        rows.append(measure(f"llm_pruner 20% {importance}", model, tok, folder, eval_text, args))
    return rows


def part_lowrank(calib_text, eval_text, work: Path, args) -> list[dict]:
    model, tok = load_model(args.model)
    rows = [measure("dense", model, tok, save_model(model, tok, work / "dense"), eval_text, args)]
    calib = calibration_data(tok, calib_text, args.calib_samples, 512)
    for ratio in args.param_ratios:
        for method in args.lowrank_methods:
            model, tok = load_model(args.model)
            start = time.perf_counter()
            decompose(model, calib if method != "svd" else None, LowRankConfig(method=method, param_ratio=ratio))
            seconds = time.perf_counter() - start
            ranks = list(model.llmlab_lowrank["modules"].values())
            folder = save_decomposed(model, tok, work / f"{method}{ratio}")
            rows.append(measure(f"{method} ratio {ratio}", model, tok, folder, eval_text, args,
                                {"shape": f"{len(ranks)} layers, ranks {min(ranks)}-{max(ranks)}", "seconds": seconds}))
    return rows


def table(rows: list[dict]) -> str:
    dense = rows[0]
    lines = ["| model | shape | params (M) | size (MiB) | ppl | gen tok/s | vs dense | time (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r.get('shape', '')} | {r['params_m']:.1f} | {r['size_mb']:.0f} | {r['ppl']:.2f} "
                     f"| {r['tok_s']:.1f} | {r['tok_s'] / dense['tok_s']:.2f}x | {r.get('seconds', 0):.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["prune", "layers", "lowrank", "baselines"], required=True)
    parser.add_argument("--model", default="smollm2-135m", help="tiny-llama for a smoke run")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per perplexity window")
    parser.add_argument("--max-windows", type=int, default=4, help="2048-token windows of the second half scored")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--calib-len", type=int, default=256, help="tokens per LLM-Pruner calibration window")
    parser.add_argument("--lora-steps", type=int, default=40, help="LoRA recovery steps (4 rows of 256 tokens); "
                                                                    "0: no recovery rows")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5], help="LLM-Pruner ratios (prune, layers)")
    parser.add_argument("--skip-first", type=int, help="LLM-Pruner layers kept dense at the start (default: its own)")
    parser.add_argument("--skip-last", type=int, help="LLM-Pruner layers kept dense at the end (default: its own)")
    parser.add_argument("--importance", choices=["taylor", "lora"], help="LLM-Pruner importance (prune part)")
    parser.add_argument("--param-ratios", type=float, nargs="+", default=[0.9, 0.7])
    parser.add_argument("--lowrank-methods", nargs="+", default=["svd", "asvd", "svd_llm"])
    args = parser.parse_args()
    calib_text, eval_text = split_text(DATA.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        run = {"prune": part_prune, "layers": part_layers, "lowrank": part_lowrank,
               "baselines": part_baselines}[args.part]
        rows = run(calib_text, eval_text, Path(tmp), args)
    print(f"\n{args.model}, WikiText-2 valid: calibration/training on the first half, ppl on {rows[0]['windows']} "
          f"x {args.seq_len} tokens of the second half; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(table(rows))


if __name__ == "__main__":
    main()

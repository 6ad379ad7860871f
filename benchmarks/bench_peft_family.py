"""The PEFT family side by side: does each method teach the built-in model the synthetic tasks?

For each method: fine-tune smollm2-135m with `llmlab finetune` (Python API) on the training
items of `llmlab.data.tasks`, then score exact match on the held-out items (disjoint by
construction) and compare with the untrained model. Reported per method: accuracy before and
after, trainable parameters, training tokens/s, peak RSS of the training process, and the size
of what the run saves (the adapter folder, or the whole model for freeze/full). Every method
runs in its own process so that peak RSS is its own.

    .venv/bin/python benchmarks/bench_peft_family.py                       # all methods (~25 min on 2 cores)
    .venv/bin/python benchmarks/bench_peft_family.py --methods lora,ia3    # some
    .venv/bin/python benchmarks/bench_peft_family.py --quick               # tiny model smoke run
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from llmlab.runs import format_table

# Learning rates per method, the usual ranges from each paper / peft's examples: input-side
# methods train few parameters from scratch and need large steps, full fine-tuning small ones.
METHODS = {
    "lora": {"lr": 1e-3, "adapter": {"r": 16, "alpha": 32, "targets": ["all-linear"]}},
    "dora": {"lr": 1e-3, "adapter": {"r": 16, "alpha": 32, "targets": ["all-linear"]}},
    "ia3": {"lr": 1e-2, "adapter": {}},
    "adapter": {"lr": 1e-3, "adapter": {"size": 64}},
    "prefix": {"lr": 3e-3, "adapter": {"virtual_tokens": 16}},
    "ptuning2": {"lr": 1e-2, "adapter": {"virtual_tokens": 16}},
    "prompt": {"lr": 3e-2, "adapter": {"virtual_tokens": 16, "init": "vocab"}},
    "ptuning": {"lr": 3e-3, "adapter": {"virtual_tokens": 16}},
    "freeze": {"lr": 1e-4, "adapter": {"layers": [-2, -1]}},
    "full": {"lr": 5e-5, "adapter": {}},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--train-per-kind", type=int, default=200)
    parser.add_argument("--heldout-per-kind", type=int, default=40)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="tiny model, a few items")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.train_per_kind, args.heldout_per_kind = "tiny-llama", 8, 2
    if args.worker:
        print(json.dumps(worker(args)))
        return
    folder = Path(tempfile.mkdtemp(prefix="peft-family-"))
    write_tasks(folder, args)
    before = score(args.model, None, folder, args)
    print(f"untrained: {100 * before['accuracy']:.1f}%", file=sys.stderr)
    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", method, "--folder", str(folder), "--model", args.model,
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--heldout-per-kind", str(args.heldout_per_kind)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
        print(method, {k: v for k, v in results[method].items() if k != "by_kind"}, file=sys.stderr)
    report(args, before, results)


def write_tasks(folder: Path, args):
    from llmlab.atomic import atomic_write_jsonl
    from llmlab.data.tasks import make_tasks
    from llmlab.stages.data import TasksConfig

    kinds = TasksConfig().kinds
    atomic_write_jsonl(folder / "train.jsonl", make_tasks(kinds, args.train_per_kind, seed=0))
    atomic_write_jsonl(folder / "heldout.jsonl", make_tasks(kinds, args.heldout_per_kind, seed=1, split="heldout"))


def score(model_spec: str, adapter: Path | None, folder: Path, args) -> dict:
    """Exact match on the held-out items, in bf16 (the same answers as fp32, twice as fast here)."""
    from llmlab.evaluate.exact_match import exact_match, read_rows
    from llmlab.models import load_model

    model, tokenizer = load_model(model_spec, dtype="bf16")
    if adapter is not None:
        from llmlab.peft import load_adapter

        load_adapter(model, adapter)
    result = exact_match(model, tokenizer, read_rows(folder / "heldout.jsonl"), progress=False)
    return {"accuracy": result["accuracy"], "by_kind": {k: v["accuracy"] for k, v in result["by_kind"].items()}}


def worker(args) -> dict:
    """Train one method, then score what the run saved, loaded afresh."""
    from llmlab.config import build
    from llmlab.runs import RunOptions
    from llmlab.stages.finetune import FinetuneConfig, finetune

    method, folder = args.worker, Path(args.folder)
    spec = METHODS[method]
    cfg = build(FinetuneConfig, {
        "model": args.model, "data": str(folder / "train.jsonl"), "method": method, "adapter": spec["adapter"],
        "max_len": 256, "train": {"lr": spec["lr"], "epochs": args.epochs, "batch_size": args.batch_size,
                                  "bf16": True, "warmup_ratio": 0.05, "save_every": 0, "eval_every": 0}})
    run = folder / method
    summary = finetune(cfg, RunOptions(out=str(run), registry=str(folder / "registry.sqlite")))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    saved = Path(summary["saved"])
    if method in ("full", "freeze"):
        after = score(str(saved), None, folder, args)
    else:
        after = score(args.model, saved, folder, args)
    return {"accuracy": after["accuracy"], "by_kind": after["by_kind"], "trainable": summary["trainable_params"],
            "total": summary["total_params"], "tokens_per_s": summary["tokens_per_s"], "peak_rss_mb": peak_rss,
            "saved_bytes": sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()),
            "steps": summary["steps"], "train_loss": summary["train_loss"], "seconds": summary["seconds"]}


def report(args, before: dict, results: dict):
    rows = []
    for method, r in results.items():
        kinds = " ".join(f"{k}:{100 * v:.0f}" for k, v in r["by_kind"].items())
        rows.append([method, f"{100 * before['accuracy']:.1f}%", f"{100 * r['accuracy']:.1f}%",
                     f"{r['trainable']:,d}", f"{100 * r['trainable'] / r['total']:.3f}%", f"{r['tokens_per_s']:.0f}",
                     f"{r['peak_rss_mb']:.0f}", _size(r["saved_bytes"]), f"{r['train_loss']:.3f}", kinds])
    print(f"\n{args.model}, {args.train_per_kind} training items per kind, {args.heldout_per_kind} held-out per kind, "
          f"{args.epochs:g} epoch(s) at batch {args.batch_size}, bf16 autocast; exact match, greedy")
    print(format_table(["method", "before", "after", "trainable", "trainable %", "tokens/s", "peak RSS MB",
                        "saved", "train loss", "after, by kind (%)"], rows))


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


if __name__ == "__main__":
    main()

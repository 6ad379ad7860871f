"""Pruning quality on the built-in model: WikiText-2 perplexity, achieved sparsity, time, peak memory.

    .venv/bin/python benchmarks/bench_prune.py [--rows dense,magnitude,wanda,sparsegpt[,sparsegpt-wanda]]
        [--patterns 50%,2:4] [--n-samples 32] [--seq-len 512] [--max-windows 4] [--per-layer FILE.json]

Rows: the dense model, then magnitude, Wanda and SparseGPT at 50% unstructured and at 2:4 (each
with its default options: magnitude per output row, SparseGPT with damp 0.01 and mask blocks of
128 columns), through `llmlab.compress.prune.prune_model`; the row sparsegpt-wanda prunes with
Wanda's mask and SparseGPT's weight update (`--options.mask wanda`). Every linear inside the
decoder layers is pruned (210 in smollm2-135m); embeddings and lm_head (tied) stay dense, as in
the papers.

Calibration text is never the evaluated text, as in bench_quantize.py: wiki.valid.raw is cut in
two at the article heading nearest its middle; the data-aware methods calibrate on `--n-samples`
windows of `--seq-len` tokens of the first half (all rows the same windows), and perplexity is
scored on the second half in 2048-token windows (GPTQ protocol, `llmlab.evaluate.perplexity`).
Each row runs in its own process, so "peak RSS" is that row's own peak over loading, calibrating
and pruning (before the evaluation). The achieved sparsity is counted on the weights themselves:
overall = zeros / weights over the pruned layers, and the minimum and maximum over the layers.
The built-in weights were de-quantized from Q4_1, so about 0.03% of them are exactly zero before
any pruning: where such a zero survives an N:M group's selection, that layer shows slightly more than
50% (still at most N nonzeros in every M).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import DATA, split_text  # noqa: E402 - the same halves of the same file

METHODS = ["magnitude", "wanda", "sparsegpt", "sparsegpt-wanda"]
# row name -> (method, options): "sparsegpt-wanda" is Wanda's mask with SparseGPT's weight update
# (the Wanda paper's §5 ablation), which splits the gap between the two into mask and update
VARIANTS = {"sparsegpt-wanda": ("sparsegpt", {"mask": "wanda"})}
PATTERNS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}, "4:8": {"pattern": "4:8"}}


def run_row(method: str, pattern: str, args) -> dict:
    """Load, prune, evaluate one row in this process; returns its numbers."""
    import torch

    from llmlab.compress.calibrate import calibration_data
    from llmlab.compress.prune import prune_method, prune_model
    from llmlab.compress.sparsity import sparsity_report
    from llmlab.evaluate.perplexity import perplexity
    from llmlab.models import load_model

    torch.set_num_threads(args.threads)
    calib_text, eval_text = split_text(DATA.read_text(encoding="utf-8"))
    model, tok = load_model("smollm2-135m")
    name, (method, options) = method, VARIANTS.get(method, (method, {}))
    needs_calib = method != "dense" and prune_method(method)[2]
    calib = calibration_data(tok, calib_text, args.n_samples, args.seq_len) if needs_calib else None
    start = time.perf_counter()
    if method != "dense":
        prune_model(model, method, calib, **PATTERNS[pattern], **options)
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    report = sparsity_report(model)
    ppl = perplexity(model, tok, eval_text, seq_len=2048, max_windows=args.max_windows, progress=False)
    return {"row": "dense" if method == "dense" else f"{name} {pattern}", "ppl": ppl["ppl"],
            "windows": ppl["windows"], "tokens": ppl["tokens_scored"], "sparsity": report["overall"],
            "sparsity_min": report["min"], "sparsity_max": report["max"], "prune_s": seconds,
            "peak_rss_mb": peak_rss, "per_layer": report["per_layer"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="dense," + ",".join(METHODS[:3]), help="dense and/or methods, comma-separated")
    names = ", ".join(PATTERNS).replace("%", "%%")  # argparse formats help strings with %
    parser.add_argument("--patterns", default="50%,2:4", help=f"comma-separated, of {names}")
    parser.add_argument("--n-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--max-windows", type=int, default=4, help="score the first N 2048-token windows "
                                                                    "(0: the whole second half)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per row")
    parser.add_argument("--per-layer", help="write every row's per-layer sparsity to this JSON file")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row ("method pattern"), print JSON
    args = parser.parse_args()
    args.max_windows = args.max_windows or None
    if args.row:
        print(json.dumps(run_row(*args.row.split(" "), args)))
        return
    wanted = args.rows.split(",")
    todo = [("dense", "-")] * ("dense" in wanted) + [(m, p) for p in args.patterns.split(",") for m in METHODS
                                                      if m in wanted]
    rows, notes = [], []
    for method, pattern in todo:
        child = [sys.executable, __file__, "--row", f"{method} {pattern}", "--n-samples", str(args.n_samples),
                 "--seq-len", str(args.seq_len), "--max-windows", str(args.max_windows or 0),
                 "--threads", str(args.threads)]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode:
            notes.append(f"{method} {pattern}: failed ({(done.stderr.strip().splitlines() or ['?'])[-1]})")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{rows[-1]['row']:<16} ppl {rows[-1]['ppl']:.3f}  ({rows[-1]['prune_s']:.0f} s)", flush=True)
    if args.per_layer:
        Path(args.per_layer).write_text(json.dumps({r["row"]: r["per_layer"] for r in rows}, indent=1))
    report(rows, notes, args)


def report(rows: list[dict], notes: list[str], args):
    calib_text, eval_text = split_text(DATA.read_text(encoding="utf-8"))
    first = rows[0] if rows else {"windows": 0, "tokens": 0}
    print(f"\nsmollm2-135m (built-in), WikiText-2 valid. Calibration: {args.n_samples} x {args.seq_len} tokens "
          f"from the first {len(calib_text):,} characters; perplexity on the other {len(eval_text):,} characters, "
          f"{first['windows']} windows x 2048 ({first['tokens']:,} tokens scored). {args.threads} threads.\n")
    print("| method | ppl | sparsity (overall) | per-layer min | per-layer max | prune (s) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['row']} | {r['ppl']:.3f} | {r['sparsity']:.6f} | {r['sparsity_min']:.6f} | "
              f"{r['sparsity_max']:.6f} | {r['prune_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()

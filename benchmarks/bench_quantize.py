"""Quantization quality on the built-in model: WikiText-2 perplexity, size on disk, time, peak memory.

    .venv/bin/python benchmarks/bench_quantize.py [--methods fp32,rtn,gptq,awq] [--n-samples 128]
        [--seq-len 512] [--max-windows N]

Rows: fp32; RTN and GPTQ at W8 (per channel, symmetric: the int8 kernel's format), W4 and W3 in
groups (asymmetric); AWQ W4 in groups; and, where their files exist, SmoothQuant W8A8, LLM.int8(),
ZeroQuant and NF4 with their default options (all through `llmlab.compress.quantize_model`).
The issue asks for groups of 128, but the built-in model is 576 wide and 128 does not divide 576:
the grouped rows use `--group-size` (default 64, which divides 576 and 1536; 192 does too).

Calibration text is never the evaluated text: wiki.valid.raw (../shared/data) is cut in two at the
article heading nearest its middle; methods calibrate on `--n-samples` windows of `--seq-len`
tokens of the first half, and perplexity is scored on the second half in 2048-token windows
(GPTQ protocol, `llmlab.evaluate.perplexity`). Each row runs in its own process, so "peak RSS" is
that row's own peak over loading, calibrating and quantizing (before the evaluation). Weight-only
layers are evaluated on their dequantize-and-matmul path, the exact fp32 arithmetic of the stored
grid: torch's int4 CPU kernel is about 30x slower than that on fp32 activations.

The built-in model's weights were de-quantized from a Q4_1 GGUF file (4-bit, groups of 32,
asymmetric): they already lie on a 4-bit grid, which flatters every 4-bit result.
"""

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_raw" / "wiki.valid.raw"

# row name -> (method, options); the method name "fp32" is the unquantized model.
ROWS = {
    "fp32": ("fp32", {}),
    "rtn w8": ("rtn", {"bits": 8, "group_size": 0, "symmetric": True}),
    "gptq w8": ("gptq", {"bits": 8, "group_size": 0, "symmetric": True}),
    "rtn w4 g": ("rtn", {"bits": 4, "group_size": "G"}),
    "gptq w4 g": ("gptq", {"bits": 4, "group_size": "G"}),
    "rtn w3 g": ("rtn", {"bits": 3, "group_size": "G"}),
    "gptq w3 g": ("gptq", {"bits": 3, "group_size": "G"}),
    "awq w4 g": ("awq", {"bits": 4, "group_size": "G"}),
    "smoothquant w8a8": ("smoothquant", {}),
    "llm_int8": ("llm_int8", {}),
    "zeroquant": ("zeroquant", {}),
    "nf4": ("nf4", {}),
}


def split_text(text: str) -> tuple[str, str]:
    """(calibration half, evaluation half): cut at the first article heading (" = Title = ") after the middle."""
    heading = re.compile(r"^ = [^=].* = $", re.MULTILINE)
    cut = next(m.start() for m in heading.finditer(text) if m.start() >= len(text) // 2)
    return text[:cut], text[cut:]


def run_row(name: str, args) -> dict:
    """Load, quantize, save, evaluate one row in this process; returns its numbers."""
    from llmlab.compress import quantize_model, save_quantized
    from llmlab.compress.calibrate import calibration_data
    from llmlab.compress.quantize import folder_bytes, get_method
    from llmlab.evaluate.perplexity import perplexity
    from llmlab.models import load_model, save_model
    from llmlab.models.packed.qlinear import QuantLinear

    method, options = ROWS[name]
    options = {k: args.group_size if v == "G" else v for k, v in options.items()}
    calib_text, eval_text = split_text(DATA.read_text(encoding="utf-8"))
    model, tok = load_model("smollm2-135m")
    needs_calib = method != "fp32" and get_method(method)[2]
    calib = calibration_data(tok, calib_text, args.n_samples, args.seq_len) if needs_calib else None
    start = time.perf_counter()
    if method != "fp32":
        quantize_model(model, method, calib, **options)
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    with tempfile.TemporaryDirectory() as tmp:
        saved = save_model(model, tok, Path(tmp) / "m") if method == "fp32" else save_quantized(model, tok, Path(tmp) / "m")
        size = folder_bytes(saved)
    QuantLinear.use_kernels = False  # see the module docstring
    ppl = perplexity(model, tok, eval_text, seq_len=2048, max_windows=args.max_windows, progress=False)
    return {"row": name.replace(" g", f" g{args.group_size}") if name.endswith(" g") else name, "ppl": ppl["ppl"], "windows": ppl["windows"], "tokens": ppl["tokens_scored"],
            "size_mb": size / 2 ** 20, "quantize_s": seconds, "peak_rss_mb": peak_rss}


def available(method: str) -> str | None:
    """None if the method's file can be imported, else why not."""
    if method == "fp32":
        return None
    from llmlab.compress.quantize import get_method

    try:
        get_method(method)
    except Exception as e:  # noqa: BLE001 - a missing or broken file of another helper: skip the row
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(dict.fromkeys(m for m, _ in ROWS.values())),
                        help="comma-separated methods to run (fp32, rtn, gptq, awq, smoothquant, llm_int8, ...)")
    parser.add_argument("--n-samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--max-windows", type=int, default=None, help="score only the first N 2048-token windows")
    parser.add_argument("--group-size", type=int, default=64, help="group size of the grouped rows (128 does not "
                                                                    "divide the built-in model's 576)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args)))
        return
    wanted = set(args.methods.split(","))
    rows, notes = [], []
    for name, (method, _) in ROWS.items():
        if method not in wanted:
            continue
        why = available(method)
        if why:
            notes.append(f"{name}: skipped ({why})")
            continue
        child = [sys.executable, __file__, "--row", name, "--n-samples", str(args.n_samples),
                 "--seq-len", str(args.seq_len), "--group-size", str(args.group_size)] + (["--max-windows", str(args.max_windows)] if args.max_windows else [])
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode:
            notes.append(f"{name}: failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'})")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{rows[-1]['row']:<18} ppl {rows[-1]['ppl']:.3f}  ({rows[-1]['quantize_s']:.0f} s)", flush=True)
    report(rows, notes, args)


def report(rows: list[dict], notes: list[str], args):
    calib_text, eval_text = split_text(DATA.read_text(encoding="utf-8"))
    first = rows[0] if rows else {"windows": 0, "tokens": 0}
    print(f"\nsmollm2-135m (built-in), WikiText-2 valid. Calibration: {args.n_samples} x {args.seq_len} tokens "
          f"from the first {len(calib_text):,} characters; perplexity on the other {len(eval_text):,} characters, "
          f"{first['windows']} windows x 2048 ({first['tokens']:,} tokens scored).")
    print("The built-in weights were de-quantized from Q4_1 (4-bit, g32, asymmetric): 4-bit rows are flattered.\n")
    print(f"| {'method':<18} | {'ppl':>8} | {'size on disk (MiB)':>18} | {'quantize (s)':>12} | {'peak RSS (MiB)':>14} |")
    print(f"|{'-' * 20}|{'-' * 9}:|{'-' * 19}:|{'-' * 13}:|{'-' * 15}:|")
    for r in rows:
        print(f"| {r['row']:<18} | {r['ppl']:>8.3f} | {r['size_mb']:>18.1f} | {r['quantize_s']:>12.1f} "
              f"| {r['peak_rss_mb']:>14.0f} |")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()

"""Distillation on the built-in model: the same student, data and step budget, one loss per row.

    .venv/bin/python benchmarks/bench_distill.py [--methods teacher,ce,kd,gkd,minillm,seqkd] [--steps 25]
        [--batch-size 8] [--seq-len 64] [--lr 2e-4] [--max-windows 2] [--per-lock 2] [--warm-steps 0]

Teacher: SmolLM2-135M-Instruct (30 layers). Student: the teacher with half its decoder layers
dropped (15 kept, evenly spaced, first and last included: `llmlab.distill.student`), so every row
starts from the same weights. Data: WikiText-2 validation cut in two at the article heading
nearest its middle (as in bench_quantize.py); training windows of `--seq-len` tokens come from the
first half, perplexity is scored on the second half in 2048-token windows (GPTQ protocol,
`llmlab.evaluate.perplexity`, the first `--max-windows`). Every row trains `--steps` AdamW steps of
`--batch-size` windows under bf16 autocast, lr `--lr` cosine with 10% warmup; the on-policy rows
(gkd, minillm) and seqkd prompt with the first 32 tokens of a window and generate 32 more.
With `--warm-steps N`, every row starts instead from one warm student: the layer-dropped one
trained N steps on hard labels (windows of the first half that no row trains on), saved in
`--work` and reused, which is how MiniLLM and GKD are run in their papers (on a fine-tuned
student, whose own samples are worth learning from). `--per-lock` rows run in one process under `flock /tmp/llmlab-heavy.lock`, so no other heavy job
shares the CPU with them. The defaults are sized for a 2-core CPU (3 to 7 minutes a row).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext2_raw" / "wiki.valid.raw"
ROLLOUT = {"prompt_len": 32, "max_new_tokens": 32}
ROWS = {  # row -> (method, options)
    "ce": ("ce", {}),
    "kd": ("kd", {"temperature": 1.0, "alpha": 1.0}),
    "kd t2 a0.5": ("kd", {"temperature": 2.0, "alpha": 0.5}),
    "seqkd": ("seqkd", {**ROLLOUT}),
    "gkd": ("gkd", {"beta": 0.5, "lmbda": 0.5, **ROLLOUT}),
    "minillm": ("minillm", {"lm_weight": 1.0, **ROLLOUT}),
}


def split_text(text: str) -> tuple[str, str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_quantize import split_text as split  # one definition of the WikiText-2 halves

    return split(text)


def run_row(name: str, args) -> dict:
    import torch

    from llmlab.distill.distill import DistillTrainConfig, distill_model, text_windows
    from llmlab.distill.student import StudentConfig, make_student
    from llmlab.evaluate.perplexity import perplexity
    from llmlab.models import load_model

    method, options = ROWS[name]
    train_text, eval_text = split_text(DATA.read_text(encoding="utf-8"))
    teacher, tok = load_model("smollm2-135m")
    n_examples = args.steps * args.batch_size  # one pass: no window is seen twice
    windows = text_windows(train_text, tok, args.seq_len, n_examples + args.warm_steps * args.batch_size)
    examples = windows[:n_examples]
    if args.warm_steps:
        student = warm_student(teacher, tok, windows[n_examples:], args)
    else:
        student, _ = make_student(StudentConfig(layers=15), teacher, tok)
    train = DistillTrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, bf16=True,
                               warmup_steps=args.steps // 10, seed=0)
    ppl = lambda m: perplexity(m, tok, eval_text, seq_len=2048, max_windows=args.max_windows,  # noqa: E731
                               progress=False)["ppl"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = ppl(student) if args.before else None
    result = distill_model(teacher, student, tok, examples, method, options, train, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = ppl(student)
    return {"row": name, "method": method, "options": options, "student_ppl": after, "student_ppl_before": before,
            "steps": result["steps"], "examples": result["examples"], "train_loss": result["train_loss"],
            "train_s": result["seconds"], "data_s": result.get("data_seconds"), "tokens_per_s": result["tokens_per_s"],
            "student_params": sum(p.numel() for p in student.parameters())}


def warm_student(teacher, tok, examples: list[dict], args):
    """The layer-dropped student after `--warm-steps` of hard labels, trained once and kept in `--work`."""
    from llmlab.distill.distill import DistillTrainConfig, distill_model
    from llmlab.distill.student import StudentConfig, make_student
    from llmlab.models import load_model, save_model

    folder = Path(args.work) / f"warm-{args.warm_steps}x{args.batch_size}x{args.seq_len}"
    if not folder.exists():
        student, _ = make_student(StudentConfig(layers=15), teacher, tok)
        train = DistillTrainConfig(max_steps=args.warm_steps, batch_size=args.batch_size, lr=args.lr, bf16=True,
                                   warmup_steps=args.warm_steps // 10, seed=0)
        distill_model(teacher, student, tok, examples, "ce", {}, train, progress=False)
        save_model(student, tok, folder)
    return load_model(str(folder))[0].requires_grad_(True)


def teacher_row(args) -> dict:
    import torch

    from llmlab.evaluate.perplexity import perplexity
    from llmlab.models import load_model

    _, eval_text = split_text(DATA.read_text(encoding="utf-8"))
    teacher, tok = load_model("smollm2-135m")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ppl = perplexity(teacher, tok, eval_text, seq_len=2048, max_windows=args.max_windows, progress=False)["ppl"]
    return {"row": "teacher", "student_ppl": ppl, "student_params": sum(p.numel() for p in teacher.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="teacher,ce,kd,gkd,minillm", help="rows to run, comma-separated: "
                        "teacher, " + ", ".join(ROWS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-windows", type=int, default=2)
    parser.add_argument("--per-lock", type=int, default=2, help="rows per process (and per hold of the lock)")
    parser.add_argument("--warm-steps", type=int, default=0, help="start every row from a student trained this "
                        "many steps on hard labels (0: from the layer-dropped teacher)")
    parser.add_argument("--work", default="/tmp/bench-distill", help="where the warm student is kept")
    parser.add_argument("--before", action="store_true", help="also score the student before training")
    parser.add_argument("--out", default="bench_distill.jsonl", help="append each row's JSON here")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run these rows, print their JSON lines
    args = parser.parse_args()
    if args.row:
        for name in args.row.split(","):
            print(json.dumps(teacher_row(args) if name == "teacher" else run_row(name, args)), flush=True)
        return
    passed = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
              "--lr", str(args.lr), "--max-windows", str(args.max_windows), "--warm-steps", str(args.warm_steps),
              "--work", args.work] + (["--before"] if args.before else [])
    names = args.methods.split(",")
    for group in (names[i:i + args.per_lock] for i in range(0, len(names), args.per_lock)):
        start = time.perf_counter()
        cmd = ["flock", "/tmp/llmlab-heavy.lock", sys.executable, __file__, "--row", ",".join(group), *passed]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{group}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        for line in out.stdout.splitlines():
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            row["group_wall_s"] = round(time.perf_counter() - start, 1)
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['row']:<12} ppl {row['student_ppl']:9.2f}  train {row.get('train_s', 0):7.1f}s  "
                  f"data {row.get('data_s') or 0:6.1f}s", flush=True)


if __name__ == "__main__":
    main()

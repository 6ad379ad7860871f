"""Distillation on the synthetic tasks: the same warm-started student, data and step budget, one loss per row.

    .venv/bin/python benchmarks/bench_distill_tasks.py [--rows teacher,warm,ce,kd,kd+ce,gkd,minillm,seqkd,cot]
        [--train-per-kind 100] [--heldout-per-kind 40] [--layers 20] [--work /tmp/distill-tasks]

The protocol of MiniLLM and GKD (both papers distil into a student that was first fine-tuned on
the task, then compare losses from there), on the tasks of `llmlab data tasks` (add, mul, units,
upper, reverse, first, last), whose answers are checked exactly:

1. teacher: SmolLM2-135M-Instruct fully fine-tuned for one epoch on the training items
   (`llmlab finetune --method full`, lr 5e-5, batch 8, bf16 autocast).
2. warm:    the teacher with its decoder layers cut to `--layers`, evenly spaced
   (`llmlab.distill.student`), trained one epoch on the training items with hard labels.
3. rows:    from that same warm student, one more epoch (the same steps, lr, batches) with each loss:
   ce (hard labels: the baseline), kd (forward KL, τ 1, α 1), kd+ce (τ 2, α 0.5: Hinton's mix),
   gkd (JSD 0.5, λ 0.5), minillm (reverse KL by policy gradient, α_mix 0.2, + LM loss), seqkd
   (the teacher's greedy answers), cot (the teacher's rationales + answers, distilling
   step-by-step; asked with "[label] " at test time).

Each model is scored on the held-out items (disjoint from training by construction): greedy exact
match, in bf16, and the perplexity of the gold answers given the prompts (teacher-forced). Every
row runs in its own process under `flock /tmp/llmlab-heavy.lock`; the teacher and the warm student
are saved in `--work` and reused, and each row's JSON is appended to `--out`, so a killed run
continues where it stopped. About 45 minutes for every row on 2 cores.
"""

import argparse
import functools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROLLOUT = {"prompt_len": 32, "max_new_tokens": 24}
ROWS = {  # row -> (method, options)
    "ce": ("ce", {}),
    "kd": ("kd", {"temperature": 1.0, "alpha": 1.0}),
    "kd+ce": ("kd", {"temperature": 2.0, "alpha": 0.5}),
    "gkd": ("gkd", {"beta": 0.5, "lmbda": 0.5, **ROLLOUT}),
    "minillm": ("minillm", {"mix_alpha": 0.2, "lm_weight": 1.0, **ROLLOUT}),
    "seqkd": ("seqkd", {**ROLLOUT, "temperature": 0.0}),
    "cot": ("cot", {"max_new_tokens": 96, "filter": True}),
}
LR, BATCH, MAX_LEN = 1e-4, 8, 256


def make_tasks(work: Path, args):
    from llmlab.atomic import atomic_write_jsonl
    from llmlab.data.tasks import make_tasks
    from llmlab.stages.data import TasksConfig

    if not (work / "heldout.jsonl").exists():
        work.mkdir(parents=True, exist_ok=True)
        kinds = TasksConfig().kinds
        atomic_write_jsonl(work / "train.jsonl", make_tasks(kinds, args.train_per_kind, seed=0))
        atomic_write_jsonl(work / "heldout.jsonl", make_tasks(kinds, args.heldout_per_kind, seed=1, split="heldout"))


def train_teacher(work: Path, args) -> dict:
    from llmlab.config import build
    from llmlab.runs import RunOptions
    from llmlab.stages.finetune import FinetuneConfig, finetune

    cfg = build(FinetuneConfig, {
        "model": args.model, "data": str(work / "train.jsonl"), "method": "full", "max_len": MAX_LEN,
        "train": {"lr": 5e-5, "epochs": 1, "batch_size": BATCH, "bf16": True, "warmup_ratio": 0.05,
                  "save_every": 0, "eval_every": 0}})
    summary = finetune(cfg, RunOptions(out=str(work / "teacher-run"), registry=str(work / "registry.sqlite")))
    return {"train_s": summary["seconds"], "steps": summary["steps"], "train_loss": summary["train_loss"]}


def distill_row(work: Path, row: str, args) -> dict:
    """Train the row's student (the warm one from the layer-dropped teacher, else from the warm one)."""
    from llmlab.data.sft import load_sft_data
    from llmlab.distill.distill import DistillTrainConfig, distill_model
    from llmlab.distill.student import StudentConfig, make_student
    from llmlab.evaluate.exact_match import read_rows
    from llmlab.models import load_model, save_model

    teacher, tok = load_model(str(work / "teacher-run" / "model"))
    if row == "warm":
        student, _ = make_student(StudentConfig(layers=args.layers), teacher, tok)
        method, options = "ce", {}
    else:
        student, _ = load_model(str(work / "warm"))
        method, options = ROWS[row]
    rows = read_rows(work / "train.jsonl")
    examples = rows if method == "cot" else load_sft_data(str(work / "train.jsonl"), tok, max_len=MAX_LEN).train
    steps = math.ceil(len(rows) / BATCH)  # one epoch of the items, whatever the method makes of them
    train = DistillTrainConfig(max_steps=steps, batch_size=BATCH, lr=LR, bf16=True, warmup_steps=steps // 20, seed=0)
    result = distill_model(teacher, student, tok, examples, method, options, train, progress=False)
    if row == "warm":
        save_model(student, tok, work / "warm")
    scores = score(student, tok, work, prefix="[label] " if method == "cot" else "")
    keep = ("steps", "train_loss", "seconds", "data_seconds", "rationales", "rationales_dropped")
    return {"row": row, "method": method, "options": options, **scores, **{k: result.get(k) for k in keep},
            "student_params": sum(p.numel() for p in student.parameters())}


def score(model, tok, work: Path, prefix: str = "") -> dict:
    """Exact match and gold-answer perplexity on the held-out items, in bf16."""
    import torch

    from llmlab.data.packing import collate
    from llmlab.data.sft import load_sft_data
    from llmlab.distill.kd import ce_loss
    from llmlab.evaluate.exact_match import exact_match, read_rows
    from llmlab.train.loop import evaluate

    rows = [{**r, "instruction": prefix + r["instruction"]} for r in read_rows(work / "heldout.jsonl")]
    model = model.to(torch.bfloat16).eval()
    em = exact_match(model, tok, rows, progress=False)
    # the gold answers' perplexity as the student is asked
    held_path = _with_prefix(rows, work) if prefix else str(work / "heldout.jsonl")
    held = load_sft_data(held_path, tok, max_len=MAX_LEN).train
    nll = evaluate(model, ce_loss, held, 16, functools.partial(collate, pad_id=tok.pad_token_id),
                   lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    return {"accuracy": em["accuracy"], "by_kind": {k: v["accuracy"] for k, v in em["by_kind"].items()},
            "answer_ppl": math.exp(nll)}


def _with_prefix(rows: list[dict], work: Path) -> str:
    from llmlab.atomic import atomic_write_jsonl

    path = work / "heldout-label.jsonl"
    atomic_write_jsonl(path, rows)
    return str(path)


def worker(row: str, args) -> dict:
    from llmlab.models import load_model

    work = Path(args.work)
    start = time.perf_counter()
    if row == "teacher":
        trained = {} if (work / "teacher-run" / "model").exists() else train_teacher(work, args)
        model, tok = load_model(str(work / "teacher-run" / "model"))
        out = {"row": "teacher", **trained, **score(model, tok, work),
               "student_params": sum(p.numel() for p in model.parameters())}
    else:
        out = distill_row(work, row, args)
    return {**out, "wall_s": round(time.perf_counter() - start, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="teacher,warm," + ",".join(ROWS), help="rows to run, in order")
    parser.add_argument("--train-per-kind", type=int, default=100)
    parser.add_argument("--heldout-per-kind", type=int, default=40)
    parser.add_argument("--layers", type=int, default=20, help="decoder layers the student keeps")
    parser.add_argument("--work", default="/tmp/distill-tasks", help="tasks, teacher and warm student live here")
    parser.add_argument("--out", default="bench_distill_tasks.jsonl", help="append each row's JSON here")
    parser.add_argument("--model", default="smollm2-135m", help="the teacher before fine-tuning")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, a few items")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.train_per_kind, args.heldout_per_kind, args.layers = "tiny-llama", 4, 2, 1
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return
    make_tasks(Path(args.work), args)
    done = {json.loads(line)["row"] for line in Path(args.out).read_text().splitlines()} if Path(args.out).exists() else set()
    passed = ["--work", args.work, "--layers", str(args.layers), "--model", args.model]
    for row in args.rows.split(","):
        if row in done:
            print(f"{row}: already in {args.out}")
            continue
        cmd = ["flock", "/tmp/llmlab-heavy.lock", sys.executable, __file__, "--worker", row, *passed]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            print(f"{row}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(lines[-1] + "\n")
        result = json.loads(lines[-1])
        kinds = " ".join(f"{k} {100 * v:.0f}" for k, v in result["by_kind"].items())
        print(f"{row:<8} EM {100 * result['accuracy']:5.1f}%  answer ppl {result['answer_ppl']:8.3f}  "
              f"wall {result['wall_s']:6.1f}s  ({kinds})", flush=True)


if __name__ == "__main__":
    main()

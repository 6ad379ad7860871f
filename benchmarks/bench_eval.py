"""Multiple-choice evaluation: llmlab vs lm-evaluation-harness (HFLM) on the same model and the same questions.

    .venv/bin/python benchmarks/bench_eval.py [--model smollm2-135m] [--threads 1] [--quick]

lm-eval runs its own task definitions (mmlu_<subject>, arc_easy, arc_challenge), pointed by local
YAMLs at the files in ../shared/data (llmlab.evaluate.lm_eval_adapter.local_tasks), with its HFLM
on the same model folder; llmlab runs `evaluate_exam` / `evaluate_arc` on the same questions in the
same few-shot setting: MMLU 5-shot on the val split of a few subjects (its test split is held out),
ARC-Easy and ARC-Challenge 0-shot on their train split (the only one here). Both run fp32, the same
batch size and threads, one after the other in this process, and are timed from task to result
(data, prompts, scoring). Prints accuracy, questions/s, their ratio and how many questions got the
same answer. Targets: accuracy within ±0.5 points, llmlab ≥ 2x lm-eval's questions/s.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from llmlab.evaluate.arc import evaluate_arc
from llmlab.evaluate.lm_eval_adapter import arc_task, exam_task
from llmlab.evaluate.mmlu import evaluate_exam
from llmlab.models import load_model, save_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SUBJECTS = ["high_school_psychology", "miscellaneous", "elementary_mathematics", "prehistory"]


def run_lm_eval(folder, tasks_dir, names, k, limit, batch_size):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hflm = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=batch_size)
    start, cpu = time.perf_counter(), time.process_time()
    out = lm_eval.simple_evaluate(model=hflm, tasks=names, num_fewshot=k, limit=limit, log_samples=True,
                                  bootstrap_iters=0, task_manager=TaskManager(include_path=str(tasks_dir),
                                                                              include_defaults=False))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    samples = [s for n in names for s in sorted(out["samples"][n], key=lambda s: s["doc_id"])]
    preds = [max(range(len(s["resps"])), key=lambda j: (s["resps"][j][0][0], -j)) for s in samples]
    return {"acc": sum(s["acc"] for s in samples) / len(samples),
            "acc_norm": sum(s.get("acc_norm", s["acc"]) for s in samples) / len(samples),
            "n": len(samples), "seconds": seconds, "cpu": cpu, "preds": preds}


def run_llmlab(model, tok, task, limit, batch_size):
    start, cpu = time.perf_counter(), time.process_time()
    if task == "mmlu":
        out = evaluate_exam(model, tok, "mmlu", str(DATA / "mmlu"), split="val", subjects=SUBJECTS, num_fewshot=5,
                            limit=limit, batch_size=batch_size)
    else:
        out = evaluate_arc(model, tok, str(DATA / "arc"), subsets=[task], split="train", limit=limit,
                           batch_size=batch_size)
    return {**out, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
            "preds": [r["pred"] for r in out["records"]]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mmlu-limit", type=int, default=20, help="questions per MMLU subject")
    parser.add_argument("--arc-limit", type=int, default=100, help="questions per ARC subset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="5 MMLU questions per subject, 20 per ARC subset")
    args = parser.parse_args()
    if args.quick:
        args.mmlu_limit, args.arc_limit = 5, 20
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    folder = Path(args.model) if Path(args.model).is_dir() else save_model(model, tok, tmp / "model")
    tasks = {"mmlu": ([exam_task(tmp / "tasks", "mmlu", str(DATA / "mmlu"), s, "val") for s in SUBJECTS], 5,
                      args.mmlu_limit),
             "easy": ([arc_task(tmp / "tasks", str(DATA / "arc"), "easy", "train")], 0, args.arc_limit),
             "challenge": ([arc_task(tmp / "tasks", str(DATA / "arc"), "challenge", "train")], 0, args.arc_limit)}
    rows = {}
    for task, (names, k, limit) in tasks.items():
        theirs = run_lm_eval(folder, tmp / "tasks", names, k, limit, args.batch_size)
        ours = run_llmlab(model, tok, task, limit, args.batch_size)
        rows[task] = (theirs, ours)
    print(f"\n{args.model}, fp32, batch {args.batch_size}, {torch.get_num_threads()} thread(s); MMLU 5-shot val "
          f"({len(SUBJECTS)} subjects x {args.mmlu_limit}), ARC 0-shot train ({args.arc_limit} per subset)")
    print(f"{'task':<20}{'n':>5}{'lm-eval':>9}{'llmlab':>9}{'diff':>7}{'same':>7}"
          f"{'lm-eval q/s':>13}{'llmlab q/s':>12}{'ratio':>7}{'ratio CPU-s':>13}")
    total = {"n": 0, "t": 0.0, "o": 0.0, "tc": 0.0, "oc": 0.0}
    for task, (theirs, ours) in rows.items():
        same = sum(a == b for a, b in zip(theirs["preds"], ours["preds"])) / theirs["n"]
        qps_t, qps_o = theirs["n"] / theirs["seconds"], ours["n"] / ours["seconds"]
        cpu_ratio = theirs["cpu"] / ours["cpu"]
        for key, value in (("n", theirs["n"]), ("t", theirs["seconds"]), ("o", ours["seconds"]),
                           ("tc", theirs["cpu"]), ("oc", ours["cpu"])):
            total[key] += value
        for metric in ("acc", "acc_norm") if task != "mmlu" else ("acc",):
            print(f"{task + ' ' + metric:<20}{theirs['n']:>5}{theirs[metric]:>9.2%}{ours[metric]:>9.2%}"
                  f"{100 * (ours[metric] - theirs[metric]):>+7.2f}{same:>7.1%}{qps_t:>13.3f}{qps_o:>12.3f}"
                  f"{qps_o / qps_t:>6.2f}x{cpu_ratio:>12.2f}x")
    print(f"{'all':<20}{total['n']:>5}{'':>32}{total['n'] / total['t']:>13.3f}{total['n'] / total['o']:>12.3f}"
          f"{total['t'] / total['o']:>6.2f}x{total['tc'] / total['oc']:>12.2f}x")
    print("q/s: questions per wall-clock second; ratio CPU-s: lm-eval's process CPU seconds over llmlab's "
          "(steadier than wall time on a shared machine)")


if __name__ == "__main__":
    main()

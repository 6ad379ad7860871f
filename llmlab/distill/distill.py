"""`llmlab distill`: train a smaller student to imitate a teacher, with one of six losses.

Every method is a loss (or a rewrite of the training data) plugged into the one training loop,
`llmlab.train.fit`:

    ce        hard labels only: the baseline             (kd.py, α = 0)
    kd        forward KL at temperature τ + CE            (kd.py; Hinton et al. 2015)
    seqkd     CE on the teacher's generations             (seqkd.py; Kim & Rush 2016)
    gkd       JSD(β) on data and on-policy samples        (gkd.py; Agarwal et al. 2023)
    minillm   reverse KL by policy gradient               (minillm.py; Gu et al. 2023)
    cot       teacher rationales + answers, two tasks     (cot.py; Hsieh et al. 2023)

The teacher is any model spec (default the built-in one); the student comes from `student.py`: the
teacher with layers dropped, a model folder (e.g. structurally pruned by `llmlab prune`), or a
fresh small config, always with the teacher's vocabulary. Training data: a plain text file
(.txt/.raw: windows of `max_len` tokens, every token a target) or instruction/chat rows in any
format of `llmlab finetune` (targets: the replies). The run folder gets the student in `model/`
and, with `--eval-text`, the teacher's and the student's perplexity on that text.

The on-policy methods (gkd, minillm) learn from the student's own samples, which are noise until
the student can do the task: as in both papers, first train it on hard labels, then distil from
there (`llmlab distill --method ce … --out runs/warm`, then `--student.source runs/warm/model`).
"""

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch

from llmlab.config import build, field
from llmlab.distill import cot, gkd, kd, minillm, seqkd
from llmlab.distill.student import StudentConfig, check_vocab_sizes, make_student
from llmlab.errors import LlmlabError, closest
from llmlab.finetune.data import IGNORE, collate, load_sft_data, read_rows
from llmlab.models import load_model, save_model
from llmlab.runs import RunOptions, start_run
from llmlab.train import TrainConfig, fit
from llmlab.train.loop import frozen_linears_to_bf16

log = logging.getLogger("llmlab")

TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")


@dataclasses.dataclass(frozen=True)
class Method:
    config: type
    loss: Any  # (teacher, tokenizer, cfg) -> loss_fn(model, batch)


METHODS = {
    "ce": Method(kd.CEConfig, lambda teacher, tokenizer, cfg: kd.ce_loss),
    "kd": Method(kd.KDConfig, lambda teacher, tokenizer, cfg: kd.kd_loss(teacher, cfg)),
    "seqkd": Method(seqkd.SeqKDConfig, lambda teacher, tokenizer, cfg: kd.ce_loss),
    "gkd": Method(gkd.GKDConfig, gkd.gkd_loss),
    "minillm": Method(minillm.MiniLLMConfig, minillm.minillm_loss),
    "cot": Method(cot.CoTConfig, lambda teacher, tokenizer, cfg: cot.cot_loss),
}


@dataclasses.dataclass
class DistillTrainConfig(TrainConfig):
    """The training loop with distillation's defaults: a fixed step budget, no mid-run checkpoints."""
    lr: float = field(1e-4, help="peak learning rate")
    max_steps: int | None = field(200, help="optimizer steps")
    eval_every: int = field(0, help="evaluate the loss on held-out examples every N steps (0: at the end)")
    save_every: int = field(0, help="checkpoint every N steps (0: never)")


@dataclasses.dataclass
class DistillConfig:
    teacher: str = field("smollm2-135m", help="teacher model spec: built-in name, folder, run folder or hub id")
    student: StudentConfig = field(default_factory=StudentConfig, help="the student")
    method: str = field("kd", help=", ".join(METHODS))
    options: dict[str, Any] = field({}, help="the method's options, e.g. --options.temperature 2 --options.beta 0.5")
    data: str = field("", help="training data: a text file (.txt/.raw) or rows (.jsonl/.json/.csv/.parquet)")
    max_len: int = field(256, help="tokens per training example (text: window length)")
    max_examples: int | None = field(None, help="use at most this many training examples")
    eval_text: str | None = field(None, help="text file to report teacher and student perplexity on")
    eval_seq_len: int = field(2048, help="tokens per perplexity window")
    eval_windows: int | None = field(4, help="perplexity windows to score (none: all)")
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig, help="the training loop")
    dtype: str = field("fp32", help="weights' dtype: fp32 or bf16 (use --train.bf16 for mixed precision)")
    device: str = field("cpu", help="cpu, cuda or auto")
    save: bool = field(True, help="save the student in <run>/model")

    @staticmethod
    def more_help() -> str:
        from llmlab.config import describe

        lines = ["", "", "--options.* of each --method:"]
        for name, method in METHODS.items():
            rows = describe(method.config, "options.")
            lines.append(f"  {name}: " + ("; ".join(f"{opt} [{default}]" for opt, default, _ in rows) or "(none)"))
        return "\n".join(lines)

    def __post_init__(self):
        if self.method not in METHODS:
            raise LlmlabError(f"unknown --method '{self.method}'{closest(self.method, METHODS)}; "
                              f"use one of {', '.join(METHODS)}")
        build(METHODS[self.method].config, self.options, "options")  # fail before loading anything
        if self.max_len < 2 or self.eval_seq_len < 2:
            raise LlmlabError("--max-len and --eval-seq-len must be at least 2")
        if self.max_examples is not None and self.max_examples < 1:
            raise LlmlabError(f"--max-examples must be at least 1, got {self.max_examples}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise LlmlabError(f"--eval-windows must be at least 1, got {self.eval_windows}")


def text_windows(text: str, tokenizer, max_len: int, max_examples: int | None = None) -> list[dict]:
    """Non-overlapping windows of `max_len` tokens, every token a target but the first."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    windows = [ids[b:b + max_len] for b in range(0, len(ids) - max_len + 1, max_len)][:max_examples]
    if not windows:
        raise LlmlabError(f"the text has only {len(ids)} tokens, fewer than one window of --max-len {max_len}")
    return [{"input_ids": w, "labels": [IGNORE] + w[1:]} for w in windows]


def training_examples(source: str, tokenizer, max_len: int, max_examples: int | None, seed: int = 0) -> list[dict]:
    if Path(source).suffix.lower() in TEXT_SUFFIXES:
        from llmlab.data.text import read_text

        return text_windows(read_text(source), tokenizer, max_len, max_examples)
    return load_sft_data(source, tokenizer, max_len=max_len, seed=seed).train[:max_examples]


def distill_model(teacher, student, tokenizer, examples: list[dict], method: str, options: dict | None = None,
                  train: TrainConfig | None = None, *, run=None, progress: bool = True) -> dict:
    """Train `student` in place against `teacher` with `method` on tokenized `examples` (or, for cot, rows).

    Returns fit's summary plus what the method's data preparation reported.
    """
    if method not in METHODS:
        raise LlmlabError(f"unknown method '{method}'{closest(method, METHODS)}; use one of {', '.join(METHODS)}")
    check_vocab_sizes(teacher, student)
    train = train or DistillTrainConfig()
    cfg = build(METHODS[method].config, options or {}, "options")
    teacher.eval().requires_grad_(False)
    if train.bf16:
        frozen_linears_to_bf16(teacher)  # the same numbers under autocast, half the memory, no casts
    start, stats, batches = time.perf_counter(), {}, functools.partial(collate, pad_id=tokenizer.pad_token_id)
    with torch.autocast(teacher.device.type, dtype=torch.bfloat16, enabled=train.bf16):
        if method == "seqkd":
            examples = seqkd.seqkd_data(teacher, tokenizer, examples, cfg)
        elif method == "cot":
            examples, stats = cot.cot_data(teacher, tokenizer, examples, cfg)
            batches = functools.partial(cot.cot_collate, pad_id=tokenizer.pad_token_id)
    stats["data_seconds"] = round(time.perf_counter() - start, 3)
    loss_fn = METHODS[method].loss(teacher, tokenizer, cfg)
    student.requires_grad_(True)
    result = fit(student, loss_fn, examples, train, collate=batches, run=run, progress=progress)
    return {**result, **stats, "examples": len(examples)}


def distill_verb(cfg: DistillConfig, opts: RunOptions) -> dict:
    if not cfg.data:
        raise LlmlabError("distill needs training data: --data FILE (a .txt/.raw text or .jsonl/.json/.csv rows)")
    from llmlab.data.text import read_text
    from llmlab.evaluate.perplexity import perplexity

    eval_text = read_text(cfg.eval_text) if cfg.eval_text else None  # a missing file fails before any work
    teacher, tokenizer = load_model(cfg.teacher, dtype=cfg.dtype, device=cfg.device)
    student, _ = make_student(cfg.student, teacher, tokenizer, cfg.dtype, cfg.device)
    if cfg.method == "cot":
        examples = read_rows(cfg.data)[:cfg.max_examples]
    else:
        examples = training_examples(cfg.data, tokenizer, cfg.max_len, cfg.max_examples, cfg.train.seed)
    def ppl(model) -> float:  # scored as trained: in bf16 under --train.bf16
        with torch.autocast(teacher.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
            return perplexity(model, tokenizer, eval_text, cfg.eval_seq_len, max_windows=cfg.eval_windows,
                              progress=False)["ppl"]

    with start_run("distill", cfg, opts, model=cfg.teacher) as run:
        before = ppl(student) if eval_text else None
        result = distill_model(teacher, student, tokenizer, examples, cfg.method, cfg.options, cfg.train, run=run)
        scores = {"teacher_ppl": ppl(teacher), "student_ppl_before": before,
                  "student_ppl": ppl(student)} if eval_text else {}
        saved = str(save_model(student, tokenizer, run.path / "model")) if cfg.save else None
        summary = run.finish({"teacher": cfg.teacher, "method": cfg.method, "saved": saved, **result, **scores,
                              "teacher_params": _params(teacher), "student_params": _params(student)})
    shown = f", student ppl {scores['student_ppl']:.2f} (teacher {scores['teacher_ppl']:.2f})" if scores else ""
    print(f"distilled {cfg.teacher} into a {_params(student) / 1e6:.2f}M-parameter student with {cfg.method} "
          f"for {result['steps']} steps, loss {result['train_loss']:.4f}{shown} -> {saved or run.path}")
    return summary


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())

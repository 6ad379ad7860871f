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

import torch

from llmlab import methods
from llmlab.config import build, field
from llmlab.data.packing import IGNORE, collate
from llmlab.data.sft import load_sft_data
from llmlab.data.text import read_text
from llmlab.distill import cot, seqkd
from llmlab.distill.student import check_vocab_sizes
from llmlab.errors import LlmlabError
from llmlab.train import TrainConfig, fit
from llmlab.train.loop import frozen_linears_to_bf16

log = logging.getLogger("llmlab")

TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")




def text_windows(text: str, tokenizer, max_len: int, max_examples: int | None = None) -> list[dict]:
    """Non-overlapping windows of `max_len` tokens, every token a target but the first."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    windows = [ids[b:b + max_len] for b in range(0, len(ids) - max_len + 1, max_len)][:max_examples]
    if not windows:
        raise LlmlabError(f"the text has only {len(ids)} tokens, fewer than one window of --max-len {max_len}")
    return [{"input_ids": w, "labels": [IGNORE] + w[1:]} for w in windows]


def training_examples(source: str, tokenizer, max_len: int, max_examples: int | None, seed: int = 0) -> list[dict]:
    if Path(source).suffix.lower() in TEXT_SUFFIXES:
        return text_windows(read_text(source), tokenizer, max_len, max_examples)
    return load_sft_data(source, tokenizer, max_len=max_len, seed=seed).train[:max_examples]


def distill_model(teacher, student, tokenizer, examples: list[dict], method: str, options: dict | None = None,
                  train: TrainConfig | None = None, *, run=None, progress: bool = True) -> dict:
    """Train `student` in place against `teacher` with `method` on tokenized `examples` (or, for cot, rows).

    Returns fit's summary plus what the method's data preparation reported.
    """
    cfg_cls, make_loss, _ = methods.load("distill", method)
    check_vocab_sizes(teacher, student)
    train = train or DistillTrainConfig()
    cfg = build(cfg_cls, options or {}, "options")
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
    loss_fn = make_loss(teacher, tokenizer, cfg)
    student.requires_grad_(True)
    result = fit(student, loss_fn, examples, train, collate=batches, run=run, progress=progress)
    return {**result, **stats, "examples": len(examples)}


@dataclasses.dataclass
class DistillTrainConfig(TrainConfig):
    """The training loop with distillation's defaults: a fixed step budget, no mid-run checkpoints."""
    lr: float = field(1e-4, help="peak learning rate")
    max_steps: int | None = field(200, help="optimizer steps")
    eval_every: int = field(0, help="evaluate the loss on held-out examples every N steps (0: at the end)")
    save_every: int = field(0, help="checkpoint every N steps (0: never)")

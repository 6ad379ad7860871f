"""`llmlab distill`: train a smaller student against a teacher with any method of the "distill" family.

    llmlab distill --method kd --data FILE --student.layers 15 --out runs/kd15
"""

import dataclasses
from typing import Any

import torch

from llmlab import methods
from llmlab.config import build, field
from llmlab.data.sft import read_rows
from llmlab.data.text import read_text
from llmlab.distill.distill import DistillTrainConfig, distill_model, training_examples
from llmlab.distill.student import StudentConfig, make_student
from llmlab.errors import LlmlabError
from llmlab.evaluate.perplexity import perplexity
from llmlab.models import load_model, save_model
from llmlab.models.surgery import count_parameters
from llmlab.runs import RunOptions, start_run


@dataclasses.dataclass
class DistillConfig:
    teacher: str = field("smollm2-135m", help="teacher model spec: built-in name, folder, run folder or hub id")
    student: StudentConfig = field(default_factory=StudentConfig, help="the student")
    method: str = field("kd", help=", ".join(methods.names("distill")))
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
        return "\n\n--options.* of each --method:\n" + methods.options_help("distill")

    def __post_init__(self):
        methods.check("distill", self.method)
        cfg_cls, _, _ = methods.load("distill", self.method)
        build(cfg_cls, self.options, "options")  # fail before loading anything
        if self.max_len < 2 or self.eval_seq_len < 2:
            raise LlmlabError("--max-len and --eval-seq-len must be at least 2")
        if self.max_examples is not None and self.max_examples < 1:
            raise LlmlabError(f"--max-examples must be at least 1, got {self.max_examples}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise LlmlabError(f"--eval-windows must be at least 1, got {self.eval_windows}")


def distill_verb(cfg: DistillConfig, opts: RunOptions) -> dict:
    if not cfg.data:
        raise LlmlabError("distill needs training data: --data FILE (a .txt/.raw text or .jsonl/.json/.csv rows)")

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
                              "teacher_params": count_parameters(teacher), "student_params": count_parameters(student)})
    shown = f", student ppl {scores['student_ppl']:.2f} (teacher {scores['teacher_ppl']:.2f})" if scores else ""
    print(f"distilled {cfg.teacher} into a {count_parameters(student) / 1e6:.2f}M-parameter student with {cfg.method} "
          f"for {result['steps']} steps, loss {result['train_loss']:.4f}{shown} -> {saved or run.path}")
    return summary



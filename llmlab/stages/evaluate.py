"""`llmlab eval ppl|em|mmlu|cmmlu|ceval|arc|gsm8k`: load a model (and adapters), score it, record the run.

The scorers themselves are in llmlab/evaluate/, one file per benchmark.
"""

import dataclasses
from dataclasses import dataclass

from llmlab.atomic import atomic_write_jsonl
from llmlab.config import field
from llmlab.data.text import read_text
from llmlab.errors import LlmlabError, closest
from llmlab.evaluate.arc import SUBSETS, evaluate_arc
from llmlab.evaluate.exact_match import exact_match, read_rows
from llmlab.evaluate.gsm8k import evaluate_gsm8k, load_gsm8k
from llmlab.evaluate.mmlu import check_subjects, evaluate_exam, exams
from llmlab.evaluate.multiple_choice import STRATEGIES
from llmlab.evaluate.perplexity import perplexity
from llmlab.models.load import ModelOptions
from llmlab.peft import load_adapter
from llmlab.peft.io import load_adapters
from llmlab.runs import RunOptions, start_run


@dataclasses.dataclass
class PerplexityConfig(ModelOptions):
    data: str = field("", help="UTF-8 text file to score")
    seq_len: int = field(2048, help="tokens per window")
    stride: int | None = field(None, help="sliding-window step; default = seq_len (non-overlapping windows)")
    max_windows: int | None = field(None, help="score only the first N windows")
    batch_size: int = field(1, help="windows per forward pass (on a CPU, 1 is fastest)")

    def __post_init__(self):
        if self.seq_len < 2:
            raise LlmlabError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.stride is not None and not 0 < self.stride <= self.seq_len:
            raise LlmlabError(f"--stride must be between 1 and --seq-len ({self.seq_len}), got {self.stride}")
        if self.max_windows is not None and self.max_windows < 1:
            raise LlmlabError(f"--max-windows must be at least 1, got {self.max_windows}")
        if self.batch_size < 1:
            raise LlmlabError(f"--batch-size must be at least 1, got {self.batch_size}")


def perplexity_verb(cfg: PerplexityConfig, opts: RunOptions) -> dict:
    if not cfg.data:
        raise LlmlabError("eval ppl needs a text file: --data FILE")
    text = read_text(cfg.data)
    model, tokenizer = cfg.load_model()
    with start_run("eval ppl", cfg, opts) as run:
        result = perplexity(model, tokenizer, text, cfg.seq_len, cfg.stride, cfg.max_windows, cfg.batch_size)
        run.log_metrics(**result)
        summary = run.finish({"model": cfg.model, "data": cfg.data, "seq_len": cfg.seq_len,
                              "stride": cfg.stride or cfg.seq_len, "dtype": cfg.dtype, **result})
    print(f"perplexity {result['ppl']:.4f} over {result['tokens_scored']:,} tokens in {result['windows']} "
          f"windows of {cfg.seq_len} ({result['tokens_per_s']:,.0f} tokens/s) -> {summary['path']}")
    return summary


@dataclass
class ExactMatchConfig(ModelOptions):
    adapter: str | None = field(None, help="folder of an adapter (HF peft format) to load onto the model")
    data: str = field("", help="alpaca .jsonl file (instruction, input, output), e.g. heldout.jsonl of `data tasks`")
    max_new_tokens: int = field(16, help="the most tokens of each answer")
    batch_size: int = field(16, help="prompts per generation batch")
    limit: int | None = field(None, help="score only the first N rows")
    chat: bool = field(True, help="ask through the chat template; false = the raw user message")

    def __post_init__(self):
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise LlmlabError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.limit is not None and self.limit < 1:
            raise LlmlabError(f"--limit must be at least 1, got {self.limit}")


def exact_match_verb(cfg: ExactMatchConfig, opts: RunOptions) -> dict:
    if not cfg.data:
        raise LlmlabError("eval em needs a .jsonl file of alpaca rows: --data FILE (see `llmlab data tasks`)")
    rows = read_rows(cfg.data, cfg.limit)
    model, tokenizer = cfg.load_model()
    if cfg.adapter:
        model = load_adapter(model, cfg.adapter)
    with start_run("eval em", cfg, opts) as run:
        result = exact_match(model, tokenizer, rows, chat=cfg.chat, max_new_tokens=cfg.max_new_tokens,
                             batch_size=cfg.batch_size)
        atomic_write_jsonl(run.artifact("predictions.jsonl"), result.pop("examples"))
        run.log_metrics(**{k: v for k, v in result.items() if k != "by_kind"})
        summary = run.finish({"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data, **result})
    for kind, s in result["by_kind"].items():
        print(f"  {kind:<10} {s['accuracy']:6.1%}  ({s['correct']}/{s['total']}, "
              f"contains {s['contains_accuracy']:.1%})")
    print(f"exact match {result['accuracy']:.1%} ({result['correct']}/{result['total']}), answer contained in "
          f"{result['contains_accuracy']:.1%} of replies, {result['seconds']:.1f}s -> {summary['path']}")
    return summary


@dataclass
class MMLUConfig(ModelOptions):
    adapter: list[str] = field([], help="adapters to load onto the model, PATH or NAME=PATH; the first is active")
    data: str = field("cais/mmlu", help="folder in MMLU's layout (dev/, val/, test/ of <subject>_<split>.csv) "
                                        "or hub id")
    split: str = field("test", help="the split to score: dev, val or test")
    subjects: list[str] = field([], help="subjects to score, comma-separated (default: all)")
    num_fewshot: int = field(5, help="solved examples from dev before each question")
    limit: int | None = field(None, help="score only the first N questions of each subject (as lm-eval's --limit)")
    batch_size: int = field(16, help="questions per forward pass")
    strategy: str = field("packed", help="packed: shared prefix cache + packed choices; full: one row per choice")

    exam = "mmlu"

    def __post_init__(self):
        splits = exams()[self.exam]["splits"]
        if self.split not in splits:
            raise LlmlabError(f"--split must be one of {', '.join(splits)}, got '{self.split}'")
        if self.num_fewshot < 0:
            raise LlmlabError(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")
        for key in ("limit", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise LlmlabError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.strategy not in STRATEGIES:
            raise LlmlabError(f"--strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'")
        check_subjects(self.exam, self.subjects)


@dataclass
class CMMLUConfig(MMLUConfig):
    data: str = field("haonan-li/cmmlu", help="folder in CMMLU's layout (dev/, test/ of <subject>.csv) or hub id")
    split: str = field("test", help="the split to score: dev or test")

    exam = "cmmlu"


@dataclass
class CEvalConfig(MMLUConfig):
    data: str = field("ceval/ceval-exam", help="folder in C-Eval's layout (dev/, val/ of <subject>_<split>.csv) "
                                               "or hub id")
    split: str = field("val", help="the split to score: dev or val (C-Eval's test has no answers)")

    exam = "ceval"


def exam_verb(cfg: MMLUConfig, opts: RunOptions) -> dict:
    model, tokenizer = cfg.load_model()
    if cfg.adapter:
        load_adapters(model, cfg.adapter)
    with start_run(f"eval {cfg.exam}", cfg, opts) as run:
        result = evaluate_exam(model, tokenizer, cfg.exam, cfg.data, split=cfg.split, subjects=cfg.subjects,
                               num_fewshot=cfg.num_fewshot, limit=cfg.limit, batch_size=cfg.batch_size,
                               strategy=cfg.strategy)
        atomic_write_jsonl(run.artifact("predictions.jsonl"), result.pop("records"))
        run.log_metrics(**{k: v for k, v in result.items() if k not in ("categories", "subjects")})
        summary = run.finish({"model": cfg.model, "adapter": cfg.adapter, "exam": cfg.exam, "data": cfg.data,
                              "split": cfg.split, "num_fewshot": cfg.num_fewshot, **result})
    print_table(result, cfg.exam)
    print(f"{cfg.exam} {cfg.num_fewshot}-shot: acc {result['acc']:.2%} over {result['n']} questions, "
          f"subject mean {result['subject_mean']:.2%}, {result['items_per_s']:.1f} questions/s -> {summary['path']}")
    return summary


def print_table(result: dict, exam: str):
    rows = list(result["subjects"].items()) if len(result["subjects"]) <= 12 else []
    rows += [(f"[{c}]", a) for c, a in result["categories"].items()]
    width = max([len(name) for name, _ in rows] + [8])
    for name, a in rows:
        print(f"  {name:<{width}}  acc {a['acc']:6.1%}  acc_norm {a['acc_norm']:6.1%}  n {a['n']}")


@dataclass
class ArcConfig(ModelOptions):
    adapter: list[str] = field([], help="adapters to load onto the model, PATH or NAME=PATH; the first is active")
    data: str = field("allenai/ai2_arc", help="folder with ARC-Easy/ and ARC-Challenge/ (<split>.json or .jsonl) "
                                              "or hub id")
    subsets: list[str] = field(["easy", "challenge"], help="easy, challenge or both, comma-separated")
    split: str = field("test", help="the split to score: train, val or test")
    num_fewshot: int = field(0, help="solved train questions before each question (lm-eval's default is 0)")
    limit: int | None = field(None, help="score only the first N questions of each subset (as lm-eval's --limit)")
    batch_size: int = field(16, help="questions per forward pass")
    strategy: str = field("packed", help="packed: shared context, packed choices; full: one row per choice")

    def __post_init__(self):
        for s in self.subsets:
            if s not in SUBSETS:
                raise LlmlabError(f"unknown ARC subset '{s}'{closest(s, SUBSETS)}; use easy, challenge or both")
        if not self.subsets:
            raise LlmlabError("--subsets needs at least one of easy, challenge")
        if self.num_fewshot < 0:
            raise LlmlabError(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")
        for key in ("limit", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise LlmlabError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.strategy not in STRATEGIES:
            raise LlmlabError(f"--strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'")


def arc_verb(cfg: ArcConfig, opts: RunOptions) -> dict:
    model, tokenizer = cfg.load_model()
    if cfg.adapter:
        load_adapters(model, cfg.adapter)
    with start_run("eval arc", cfg, opts) as run:
        result = evaluate_arc(model, tokenizer, cfg.data, subsets=cfg.subsets, split=cfg.split,
                              num_fewshot=cfg.num_fewshot, limit=cfg.limit, batch_size=cfg.batch_size,
                              strategy=cfg.strategy)
        atomic_write_jsonl(run.artifact("predictions.jsonl"), result.pop("records"))
        run.log_metrics(**{k: v for k, v in result.items() if k != "subsets"})
        summary = run.finish({"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data, "split": cfg.split,
                              "num_fewshot": cfg.num_fewshot, **result})
    for name, a in result["subsets"].items():
        print(f"  {name:<14} acc {a['acc']:6.1%}  acc_norm {a['acc_norm']:6.1%}  n {a['n']}")
    print(f"arc {cfg.num_fewshot}-shot: {result['n']} questions, {result['items_per_s']:.1f} questions/s "
          f"-> {summary['path']}")
    return summary


@dataclass
class GSM8KConfig(ModelOptions):
    adapter: list[str] = field([], help="adapters to load onto the model, PATH or NAME=PATH; the first is active")
    data: str = field("openai/gsm8k", help=".jsonl file of {question, answer}, a folder of <split>.jsonl, or hub id")
    split: str = field("test", help="the split to score (a folder's <split>.jsonl, or the hub's)")
    num_fewshot: int = field(8, help="chain-of-thought exemplars before each question (0 to 8)")
    max_new_tokens: int = field(256, help="the most tokens of each reply (lm-eval's max_gen_toks)")
    limit: int | None = field(None, help="score only the first N questions")
    batch_size: int = field(8, help="prompts per generation batch")

    def __post_init__(self):
        if not 0 <= self.num_fewshot <= 8:
            raise LlmlabError(f"--num-fewshot must be 0 to 8 (the exemplars there are), got {self.num_fewshot}")
        for key in ("max_new_tokens", "batch_size", "limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise LlmlabError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")


def gsm8k_verb(cfg: GSM8KConfig, opts: RunOptions) -> dict:
    rows = load_gsm8k(cfg.data, cfg.split)[:cfg.limit]
    model, tokenizer = cfg.load_model()
    if cfg.adapter:
        load_adapters(model, cfg.adapter)
    with start_run("eval gsm8k", cfg, opts) as run:
        result = evaluate_gsm8k(model, tokenizer, rows, num_fewshot=cfg.num_fewshot,
                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        atomic_write_jsonl(run.artifact("predictions.jsonl"), result.pop("records"))
        run.log_metrics(**result)
        summary = run.finish({"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data, "split": cfg.split,
                              "num_fewshot": cfg.num_fewshot, **result})
    print(f"gsm8k {cfg.num_fewshot}-shot CoT: strict-match {result['strict_match']:.1%}, flexible-extract "
          f"{result['flexible_extract']:.1%} over {result['n']} questions ({result['seconds']:.0f}s) "
          f"-> {summary['path']}")
    return summary

"""`llmlab data …`: synthetic tasks, the data pipeline, tokenizer training and token shards.

    llmlab data tasks --kinds all --out runs/tasks
    llmlab data run pipeline.yaml
    llmlab data tokenizer --input.path corpus.txt --kinds bpe,unigram
    llmlab data pack --input.path corpus.jsonl --tokenizer smollm2-135m
"""

from dataclasses import dataclass
from typing import Literal

from llmlab.atomic import atomic_write_jsonl
from llmlab.config import field
from llmlab.data.pipeline import PipelineConfig, run_pipeline
from llmlab.data.readers import InputConfig
from llmlab.data.shards import load_tokenizer, pack_texts
from llmlab.data.steps.decontaminate import EvalFiles, read_items
from llmlab.data.tasks import GROUPS, KINDS, expand_kinds, make_tasks
from llmlab.data.tokenizer_train import KINDS as TOKENIZER_KINDS
from llmlab.data.tokenizer_train import compression_table, iter_texts, train_tokenizer
from llmlab.errors import LlmlabError
from llmlab.runs import RunOptions, start_run


@dataclass
class TasksConfig:
    kinds: list[str] = field(["add", "mul", "units", "upper", "reverse", "first", "last"],
                             help=f"task kinds or groups: {', '.join([*KINDS, *GROUPS])}")
    train_per_kind: int = field(300, help="training items of each kind")
    heldout_per_kind: int = field(100, help="held-out items of each kind")
    seed: int = field(0, help="seed of the sampling; the split does not depend on it")
    heldout_fraction: float = field(0.2, help="share of each kind's item space reserved for held-out")

    def __post_init__(self):
        if not self.kinds:
            raise LlmlabError("--kinds must name at least one task kind, e.g. --kinds add,units")
        expand_kinds(self.kinds)
        for key in ("train_per_kind", "heldout_per_kind"):
            if getattr(self, key) < 1:
                raise LlmlabError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if not 0 < self.heldout_fraction < 1:
            raise LlmlabError(f"--heldout-fraction must be between 0 and 1, got {self.heldout_fraction}")


def tasks_verb(cfg: TasksConfig, opts: RunOptions) -> dict:
    kinds = expand_kinds(cfg.kinds)
    train = make_tasks(kinds, cfg.train_per_kind, cfg.seed, "train", cfg.heldout_fraction)
    heldout = make_tasks(kinds, cfg.heldout_per_kind, cfg.seed, "heldout", cfg.heldout_fraction)
    with start_run("data tasks", cfg, opts) as run:
        atomic_write_jsonl(run.artifact("train.jsonl"), train)
        atomic_write_jsonl(run.artifact("heldout.jsonl"), heldout)
        summary = run.finish({"kinds": kinds, "train": len(train), "heldout": len(heldout),
                              "train_file": str(run.artifact("train.jsonl")),
                              "heldout_file": str(run.artifact("heldout.jsonl"))})
    print(f"{len(train)} training and {len(heldout)} held-out items of {', '.join(kinds)} -> {summary['path']}")
    return summary


@dataclass
class TokenizerConfig:
    input: InputConfig = field(default_factory=InputConfig, help="the training corpus (as in pipeline input)")
    kinds: list[str] = field(["bpe"], help=f"tokenizers to train: {', '.join(TOKENIZER_KINDS)}")
    vocab_size: int = field(8000, help="vocabulary size, special tokens included")
    min_frequency: int = field(2, help="BPE/WordPiece: merges seen fewer times are not made")
    special_tokens: list[str] = field(["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                      help="special tokens; the first is end-of-text (EOS and padding)")
    max_docs: int | None = field(None, help="train on at most this many documents")
    heldout: list[dict] = field([], help="held-out text for bytes per token: [{name: en, path, fields}, ...]")
    heldout_items: int = field(2000, help="items read from each held-out set")

    def __post_init__(self):
        if not self.input.path:
            raise LlmlabError("--input.path is required: the text to train on (file, folder or glob)")
        bad = [k for k in self.kinds if k not in TOKENIZER_KINDS]
        if bad or not self.kinds:
            raise LlmlabError(f"--kinds must name tokenizers from {', '.join(TOKENIZER_KINDS)}; "
                              f"got {', '.join(bad) or 'none'}")
        if not self.special_tokens:
            raise LlmlabError("--special-tokens needs at least the end-of-text token, e.g. <|endoftext|>")
        if not 256 + len(self.special_tokens) < self.vocab_size <= 1 << 20:  # byte-level BPE starts from 256 bytes
            raise LlmlabError(f"--vocab-size must exceed 256 + the {len(self.special_tokens)} special tokens and be "
                              f"at most 2^20, got {self.vocab_size}")
        for i, entry in enumerate(self.heldout):
            if not isinstance(entry, dict) or not entry.get("name") or not entry.get("path"):
                raise LlmlabError(f"heldout[{i}] must be a mapping with a name and a path, e.g. "
                                  "{name: zh, path: zh.jsonl, fields: [text]}")


def tokenizer_verb(cfg: TokenizerConfig, opts: RunOptions) -> dict:
    heldout = {str(h["name"]): read_items(EvalFiles.from_dict(h))[:cfg.heldout_items] for h in cfg.heldout}
    with start_run("data tokenizer", cfg, opts) as run:
        trained, folders = {}, {}
        for kind in cfg.kinds:
            texts = iter_texts(cfg.input, cfg.max_docs)
            trained[kind] = train_tokenizer(texts, kind, cfg.vocab_size, cfg.special_tokens, cfg.min_frequency)
            folders[kind] = run.artifact(f"tokenizer-{kind}")
            trained[kind].save_pretrained(folders[kind])
            run.log_metrics(kind=kind, vocab=len(trained[kind]))
        table, numbers = compression_table(trained, heldout) if heldout else ("", {})
        summary = run.finish({"tokenizers": {k: str(v) for k, v in folders.items()},
                              "vocab": {k: len(t) for k, t in trained.items()}, "bytes_per_token": numbers})
    if table:
        print(table)
    for kind, folder in folders.items():
        print(f"{kind}: {len(trained[kind])} tokens -> {folder}")
    return summary


@dataclass
class PackConfig:
    input: InputConfig = field(default_factory=InputConfig, help="the documents to pack (as in pipeline input)")
    tokenizer: str = field("", help="a tokenizer folder (e.g. from `llmlab data tokenizer`), model name or hub id")
    shard_tokens: int = field(1 << 24, help="tokens per shard file")
    dtype: Literal["auto", "uint16", "uint32"] = field("auto", help="auto: uint16 when the vocabulary fits")
    max_docs: int | None = field(None, help="pack at most this many documents")

    def __post_init__(self):
        if not self.input.path:
            raise LlmlabError("--input.path is required: the documents to tokenize (file, folder or glob)")
        if not self.tokenizer:
            raise LlmlabError("--tokenizer is required: a tokenizer folder, a model name or a hub id")
        if self.shard_tokens < 2:
            raise LlmlabError(f"--shard-tokens must be at least 2, got {self.shard_tokens}")


def pack_verb(cfg: PackConfig, opts: RunOptions) -> dict:
    tokenizer = load_tokenizer(cfg.tokenizer)
    with start_run("data pack", cfg, opts) as run:
        manifest = pack_texts(iter_texts(cfg.input, cfg.max_docs), tokenizer, run.artifact("tokens"),
                              cfg.shard_tokens, cfg.dtype, cfg.tokenizer)
        summary = run.finish({key: manifest[key] for key in ("total_tokens", "documents", "dtype", "eos_id")}
                             | {"shards": len(manifest["shards"]), "tokens_dir": str(run.artifact("tokens"))})
    print(f"{manifest['documents']} documents, {manifest['total_tokens']} tokens ({manifest['dtype']}) in "
          f"{len(manifest['shards'])} shard(s) -> {run.artifact('tokens')}")
    return summary


def run_verb(cfg: PipelineConfig, opts: RunOptions) -> dict:
    """`llmlab data run pipeline.yaml`: read, filter, de-duplicate, redact and write shards (pipeline.py)."""
    return run_pipeline(cfg, opts)

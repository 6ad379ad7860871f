"""Pretraining text as one token stream, read in windows: token shards (memory-mapped) or text tokenized here.

    corpus = Corpus.open("runs/pack", tokenizer)       # a `llmlab data pack` folder: never loaded whole
    corpus = Corpus.open("books/", tokenizer)           # .txt/.md/.jsonl files: tokenized now, held in memory
    train, held_out = corpus.split(0.01)                # the last 1% of the stream for validation
    data = Windows(train, seq_len=256, order="random", seed=0)   # data[i]: (seq_len + 1,) int64 tokens

Documents are joined with the tokenizer's EOS between them, as GPT-2/nanoGPT pretraining does.
`Windows` is a plain sequence, so the one `fit()` loop shuffles and resumes it like any dataset:
"sequential" windows tile each part of the stream without overlap (one token shared, for the
shifted target); "random" windows start anywhere (nanoGPT's sampler), the start of window i a
function of (seed, i) alone, so a resumed run reads the same windows. `Mixture` draws a fraction of
the items from a second (old-domain) set of windows, for replay in continual pretraining.
"""

import json
from pathlib import Path

import numpy as np

from llmlab.data.shards import MANIFEST, tokenize
from llmlab.errors import LlmlabError

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json")


class Corpus:
    """A token stream in parts (one per shard, or one array), with its EOS id and vocabulary size."""

    def __init__(self, parts: list[np.ndarray], eos_id: int, vocab_size: int, name: str):
        self.parts, self.eos_id, self.vocab_size, self.name = [p for p in parts if len(p)], eos_id, vocab_size, name

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @classmethod
    def open(cls, spec: str | Path, tokenizer, vocab_size: int | None = None) -> "Corpus":
        """Shards (a folder with manifest.json, or a `data pack` run folder), or text files tokenized now.

        `vocab_size` is the model's: token ids at or above it are refused, naming the shard.
        """
        path = Path(spec)
        vocab_size = vocab_size or len(tokenizer)
        for folder in (path, path / "tokens"):
            if (folder / MANIFEST).is_file():
                return cls._shards(folder, vocab_size)
        if not path.exists():
            raise LlmlabError(f"pretraining data {spec} does not exist: give token shards (`llmlab data pack`) "
                              f"or a text file or folder")
        return cls._text(path, tokenizer, vocab_size)

    @classmethod
    def _shards(cls, folder: Path, vocab_size: int) -> "Corpus":
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("dtype") not in ("uint16", "uint32"):
            raise LlmlabError(f"{folder / MANIFEST}: dtype {manifest.get('dtype')!r} is not a token-shard dtype "
                              f"(uint16 or uint32); pack the text again with `llmlab data pack`")
        dtype, parts = np.dtype(manifest["dtype"]), []
        for info in manifest["shards"]:
            file = folder / info["file"]
            size = file.stat().st_size if file.is_file() else -1
            if size != info["tokens"] * dtype.itemsize:
                raise LlmlabError(f"shard {file} holds {size} bytes, not the {info['tokens']} {dtype.name} tokens "
                                  f"its manifest says: the shard is damaged or of another dtype; pack it again")
            part = np.memmap(file, dtype=dtype, mode="r", shape=(info["tokens"],)) if info["tokens"] else np.empty(0)
            if len(part) and int(part.max()) >= vocab_size:
                raise LlmlabError(f"shard {file} has token id {int(part.max())}, outside the model's vocabulary of "
                                  f"{vocab_size}: it was packed with another tokenizer ({manifest.get('tokenizer')})")
            parts.append(part)
        return cls(parts, int(manifest["eos_id"]), vocab_size, str(folder))

    @classmethod
    def _text(cls, path: Path, tokenizer, vocab_size: int) -> "Corpus":
        if tokenizer.eos_token_id is None:
            raise LlmlabError("the tokenizer has no EOS token to put between documents; give one that has")
        files = sorted(f for f in path.rglob("*") if f.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise LlmlabError(f"{path} holds no {', '.join(TEXT_SUFFIXES)} files to pretrain on")
        ids = []
        for doc in tokenize(_documents(files), tokenizer):
            ids.extend(doc)
            ids.append(tokenizer.eos_token_id)
        stream = np.asarray(ids, dtype=np.int64)
        if len(stream) and int(stream.max()) >= vocab_size:
            raise LlmlabError(f"the tokenizer gives id {int(stream.max())}, outside the model's vocabulary of "
                              f"{vocab_size}: use the model's own tokenizer")
        return cls([stream], tokenizer.eos_token_id, vocab_size, str(path))

    def split(self, fraction: float) -> tuple["Corpus", "Corpus"]:
        """(everything but the last `fraction` of the stream, that last part)."""
        held = int(round(len(self) * fraction))
        head, tail, left = [], [], held
        for part in reversed(self.parts):
            cut = max(len(part) - left, 0)
            head.insert(0, part[:cut])
            tail.insert(0, part[cut:])
            left -= len(part) - cut
        make = lambda parts: Corpus(parts, self.eos_id, self.vocab_size, self.name)  # noqa: E731
        return make(head), make(tail)


def _documents(files):
    """Each .txt/.md file is a document; each JSONL/JSON row's "text" is one."""
    for file in files:
        raw = file.read_text(encoding="utf-8")
        if file.suffix == ".jsonl":
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    yield _text_of(json.loads(line), file, n)
        elif file.suffix == ".json":
            rows = json.loads(raw)
            for n, row in enumerate(rows if isinstance(rows, list) else [rows], 1):
                yield _text_of(row, file, n)
        else:
            yield raw


def _text_of(row, file, n: int) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise LlmlabError(f"{file} row {n}: pretraining rows need a \"text\" string field")
    return row["text"]


class Windows:
    """Windows of seq_len + 1 tokens over a corpus: a sequence that fit() batches (see the module docstring)."""

    def __init__(self, corpus: Corpus, seq_len: int, order: str = "sequential", seed: int = 0,
                 count: int | None = None):
        if order not in ("sequential", "random"):
            raise LlmlabError(f"unknown window order '{order}'; use sequential or random")
        self.parts = [p for p in corpus.parts if len(p) > seq_len]
        if not self.parts:
            raise LlmlabError(f"{corpus.name}: no part of the data holds one window of {seq_len + 1} tokens "
                              f"({len(corpus)} tokens in all); give more text or a shorter --seq-len")
        self.seq_len, self.order, self.seed = seq_len, order, seed
        self._tiles = np.cumsum([(len(p) - 1) // seq_len for p in self.parts])
        sizes = np.array([len(p) - seq_len for p in self.parts], dtype=np.float64)
        self._weights = sizes / sizes.sum()
        self.count = count if count is not None else int(self._tiles[-1])

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self.order == "random":
            rng = np.random.default_rng([self.seed, int(i)])
            k = int(rng.choice(len(self.parts), p=self._weights)) if len(self.parts) > 1 else 0
            start = int(rng.integers(0, len(self.parts[k]) - self.seq_len))
        else:
            i = int(i) % int(self._tiles[-1])
            k = int(np.searchsorted(self._tiles, i, side="right"))
            start = (i - (int(self._tiles[k - 1]) if k else 0)) * self.seq_len
        return np.asarray(self.parts[k][start:start + self.seq_len + 1], dtype=np.int64)


class Mixture:
    """Windows of `new` with a `fraction` of `old` mixed in (replay against forgetting in continual pretraining):
    item i comes from old when a draw seeded by (seed, i) falls under the fraction."""

    def __init__(self, new, old, fraction: float, seed: int):
        self.new, self.old, self.fraction, self.seed = new, old, fraction, seed

    def __len__(self) -> int:
        return round(len(self.new) / (1 - self.fraction))

    def __getitem__(self, i: int):
        if np.random.default_rng([self.seed, 7, int(i)]).random() < self.fraction:
            return self.old[int(i) % len(self.old)]
        return self.new[int(i) % len(self.new)]

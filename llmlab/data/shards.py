"""Token shards: documents tokenized and packed end to end into memory-mapped uint16/uint32 files.

As in GPT-2/nanoGPT pretraining data (and fineweb-edu's .bin shards), the corpus becomes one
token stream with the end-of-text id after each document,

    stream = ids(doc₀) EOS ids(doc₁) EOS …,

cut into files of `shard_tokens` tokens (the last one shorter). Ids are stored as uint16 when
the vocabulary fits (vocab_size ≤ 65,536: half the disk and page cache), else uint32. The folder:

    manifest.json        {"dtype", "eos_id", "vocab_size", "tokenizer", "total_tokens", "documents",
                          "shards": [{"file": "shard_00000.bin", "tokens": N}, …]}
    shard_00000.bin …    raw little-endian ids, no header: np.memmap(file, dtype) reads them

The folder is built under a temporary name and renamed into place at the end, so a run killed
midway leaves no folder and no manifest. Training reads fixed windows with `TokenShards`:

    data = TokenShards("runs/pack/tokens", seq_len=1024)      # len(data) windows of 1025 tokens
    x = torch.from_numpy(data.batch(rng.integers(len(data), size=8)))   # (B, T + 1) int64
    inputs, targets = x[:, :-1], x[:, 1:]                    # next-token prediction

Window i is stream[i·T : i·T + T + 1] inside one shard (the last token of a window is the first
of the next, for the shifted target); `data[i]` is a read-only view of the memory map, no copy.
A window may span a document boundary, with the EOS between them, as in GPT-style pretraining.
"""

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from llmlab.atomic import atomic_dir, atomic_write_json
from llmlab.errors import LlmlabError

MANIFEST = "manifest.json"


def choose_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab_size ≤ 2¹⁶), else uint32; an explicit dtype is checked."""
    if dtype == "auto":
        return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    out = np.dtype(dtype)
    if vocab_size > np.iinfo(out).max + 1:
        raise LlmlabError(f"dtype {dtype} cannot hold ids of a {vocab_size}-token vocabulary; use uint32 or auto")
    return out


def pack_ids(docs: Iterable[list[int]], out: str | Path, eos_id: int, vocab_size: int,
             shard_tokens: int = 1 << 24, dtype: str = "auto", tokenizer: str = "") -> dict:
    """Write documents' token ids (EOS after each) into shards and a manifest in `out`; return the manifest."""
    dt = choose_dtype(vocab_size, dtype)
    if not 0 <= eos_id < vocab_size:
        raise LlmlabError(f"eos id {eos_id} is outside the vocabulary of {vocab_size} tokens")
    shards, buf, fill, n_docs = [], np.empty(shard_tokens, dtype=dt), 0, 0
    with atomic_dir(out) as tmp:
        def flush(n: int):
            name = f"shard_{len(shards):05d}.bin"
            buf[:n].tofile(tmp / name)
            shards.append({"file": name, "tokens": int(n)})

        for ids in docs:
            ids = np.append(np.asarray(ids, dtype=np.int64), eos_id)
            if ids.min() < 0 or ids.max() >= vocab_size:
                raise LlmlabError(f"document {n_docs} has token id {int(ids.max())} outside the vocabulary "
                                  f"of {vocab_size}")
            n_docs += 1
            while len(ids):  # a document may continue in the next shard
                take = min(len(ids), shard_tokens - fill)
                buf[fill:fill + take] = ids[:take]
                fill, ids = fill + take, ids[take:]
                if fill == shard_tokens:
                    flush(fill)
                    fill = 0
        if fill or not shards:
            flush(fill)
        manifest = {"format": "llmlab-token-shards", "version": 1, "dtype": dt.name, "eos_id": int(eos_id),
                    "vocab_size": int(vocab_size), "tokenizer": tokenizer, "shard_tokens": int(shard_tokens),
                    "total_tokens": sum(s["tokens"] for s in shards), "documents": n_docs, "shards": shards}
        atomic_write_json(tmp / MANIFEST, manifest)  # last: a folder with a manifest is a finished one
    return manifest


def load_tokenizer(spec: str):
    """A transformers tokenizer from a tokenizer folder, or a model's (built-in name, folder, hub id)."""
    folder = Path(spec)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from llmlab.models.tiny import byte_tokenizer, tiny_configs

    if spec in tiny_configs():
        return byte_tokenizer()
    from llmlab.models import load_model

    return load_model(spec)[1]


def tokenize(texts: Iterable[str], tokenizer, batch: int = 1000) -> Iterator[list[int]]:
    """Token ids of each text without special tokens, encoded in batches (fast tokenizers run them in parallel)."""
    chunk = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]
            chunk = []
    if chunk:
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


def pack_texts(texts: Iterable[str], tokenizer, out: str | Path, shard_tokens: int = 1 << 24,
               dtype: str = "auto", name: str = "") -> dict:
    """Tokenize texts with a transformers tokenizer and pack them; EOS is the tokenizer's eos token."""
    if tokenizer.eos_token_id is None:
        raise LlmlabError(f"tokenizer {name or ''} has no eos token to separate documents")
    texts = tqdm(texts, desc="tokenizing", unit="doc", disable=None, leave=False)
    return pack_ids(tokenize(texts, tokenizer), out, tokenizer.eos_token_id, len(tokenizer),
                    shard_tokens, dtype, name)


class TokenShards:
    """Fixed windows of seq_len + 1 tokens over packed shards, read through numpy memory maps."""

    def __init__(self, path: str | Path, seq_len: int):
        path = Path(path)
        if not (path / MANIFEST).is_file() and (path / "tokens" / MANIFEST).is_file():
            path = path / "tokens"  # the run folder of `llmlab data pack`
        if not (path / MANIFEST).is_file():
            raise LlmlabError(f"{path} holds no {MANIFEST}: not a finished token-shard folder "
                              "(`llmlab data pack` writes one)")
        if seq_len < 1:
            raise LlmlabError(f"seq_len must be at least 1, got {seq_len}")
        self.path, self.seq_len = path, seq_len
        self.manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        self.dtype = np.dtype(self.manifest["dtype"])
        self.eos_id = self.manifest["eos_id"]
        counts = [max(0, (s["tokens"] - 1) // seq_len) for s in self.manifest["shards"]]
        self._ends = np.cumsum(counts)                 # windows up to and including each shard
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def shard(self, k: int) -> np.memmap:
        """The k-th shard's tokens, memory-mapped on first use."""
        if k not in self._maps:
            info = self.manifest["shards"][k]
            self._maps[k] = np.memmap(self.path / info["file"], dtype=self.dtype, mode="r", shape=(info["tokens"],))
        return self._maps[k]

    def __getitem__(self, i: int) -> np.ndarray:
        """Window i: (seq_len + 1,) tokens, a read-only view into the memory map."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        i %= n
        k = int(np.searchsorted(self._ends, i, side="right"))
        start = (i - (int(self._ends[k - 1]) if k else 0)) * self.seq_len
        return self.shard(k)[start:start + self.seq_len + 1]

    def batch(self, indices) -> np.ndarray:
        """(B, seq_len + 1) int64 windows: the one copy a training step needs."""
        return np.stack([self[int(i)] for i in indices]).astype(np.int64)


# ---- the `llmlab data pack` verb ----


__all__ = ["choose_dtype", "pack_ids", "load_tokenizer", "tokenize", "pack_texts", "TokenShards"]

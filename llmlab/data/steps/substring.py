"""Exact substring de-duplication with a suffix array: strike every span of ≥ k tokens that repeats.

K. Lee, D. Ippolito, A. Nystrom, C. Zhang, D. Eck, C. Callison-Burch, N. Carlini,
"Deduplicating Training Data Makes Language Models Better", ACL 2022, https://arxiv.org/abs/2107.06499
(code: github.com/google-research/deduplicate-text-datasets).

The corpus is one sequence s = doc₀ ‖ σ₀ ‖ doc₁ ‖ σ₁ ‖ … of tokens (UTF-8 bytes, or a tokenizer's
ids), where each separator σ_d is a symbol of its own, so no match can run across documents.
In the suffix array SA (the suffixes of s in sorted order) equal prefixes are adjacent, and

    LCP[i] = |longest common prefix of s[SA[i-1]:] and s[SA[i]:]|,

so the k-token window starting at SA[i] also occurs elsewhere exactly when it is joined to a
neighbour by LCP ≥ k. A token is removed when it lies in such a repeated window. The paper's
code strikes *every* occurrence ("we suggest just taking all of these duplicate sequences … and
completely striking them from the dataset", the repo's README; `collect` reports the byte ranges
of all copies); that is the default here. `keep_first: true` keeps the earliest occurrence of
each repeated window instead. Documents this leaves shorter than `min_chars` are dropped.

SA and LCP come from pydivsufsort (Y. Mori's libdivsufsort and Kasai's LCP, in C) where it is
installed, as it is with llmlab; the numpy construction below is the reference the tests hold it
to, and the fallback. SA is built there by prefix doubling (Manber & Myers 1990; Larsson & Sadakane 2007) with numpy
sorts: suffixes are grouped by their first h tokens, and each group that still holds more than
one suffix is re-sorted by the pairs (rank_h[i], rank_h[i+h]) — O(n log n) per round, and the
rounds after the first few touch only the repeated text. The first rounds are one sort of as
many tokens as fit in an int64 (4 bytes of text per key for a corpus of < 2¹⁴ documents). LCP is computed from the same
rank tables by binary lifting — LCP ≥ 2^l + m iff the 2^l-token ranks agree at offset m — which
vectorises, where Kasai's O(n) algorithm is a sequential loop (the tests check against it).
"""

from dataclasses import dataclass
from itertools import compress
from typing import Iterator

import numpy as np

from llmlab.config import field
from llmlab.data.shards import load_tokenizer
from llmlab.data.steps.base import Step, StepLog
from llmlab.errors import LlmlabError


def suffix_array(seq: np.ndarray, lcp_cap: int | None = None, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(SA, LCP) of a non-negative integer sequence; LCP[0] = 0, LCP exact up to `lcp_cap` (None: exact).

    LCP values ≥ lcp_cap are only known to be ≥ lcp_cap, which is all de-duplication needs and
    keeps only the rank tables of prefix lengths up to lcp_cap in memory. `backend`: "divsufsort"
    (pydivsufsort; exact LCP), "numpy" (the prefix doubling below) or "auto" (the first if installed).
    """
    n, seq = len(seq), np.asarray(seq, dtype=np.int64)
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if backend == "divsufsort" or backend == "auto" and _divsufsort() is not None:
        return _suffix_array_divsufsort(seq)
    if backend not in ("auto", "numpy"):
        raise ValueError(f"unknown suffix array backend {backend!r}")
    h = _pack_width(int(seq.max()))
    # tables[l]: equal where the 2^l-token prefixes are equal (packed keys, then group ranks)
    tables = [_prefix_keys(seq, 1 << level) for level in range(h.bit_length())
              if lcp_cap is None or 1 << level <= lcp_cap]
    key = _prefix_keys(seq, h)            # the first rounds of doubling in one sort of packed tokens
    sa = np.argsort(key)
    rank = np.empty(n, dtype=np.int64)    # rank[i]: SA slot where the group of suffix i starts
    slots, rank[sa] = _regroup(np.arange(n), key[sa])   # slots: groups (equal h-prefix) of > 1 suffix
    while len(slots):
        # Larsson–Sadakane: only unsorted groups are re-sorted, by (rank of i, rank of i + h)
        members = sa[slots]
        second = np.full(len(members), -1, dtype=np.int64)   # -1: the suffix ended, so it sorts first
        inside = members + h < n
        second[inside] = rank[members[inside] + h]
        key = rank[members] * (n + 1) + second + 1           # the pair as one int64 (n < 3·10⁹)
        order = np.argsort(key)
        sa[slots] = members[order]
        unsorted, rank[members[order]] = _regroup(slots, key[order])
        slots, h = unsorted, 2 * h
        if lcp_cap is None or h <= lcp_cap:
            tables.append(rank.astype(np.int32))
    return sa, _lcp(sa, tables, n)


def _divsufsort():
    try:
        import pydivsufsort
    except ImportError:
        return None
    return pydivsufsort


def _suffix_array_divsufsort(seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lib = _divsufsort()
    if lib is None:
        raise LlmlabError("the divsufsort backend needs pydivsufsort: pip install pydivsufsort")
    sa = lib.divsufsort(seq)
    after = lib.kasai(seq, sa)  # after[i] = LCP(SA[i], SA[i+1]); llmlab's LCP[i] is with SA[i-1]
    return sa.astype(np.int64), np.concatenate([[0], after[:-1]]).astype(np.int64)


def _pack_width(largest: int) -> int:
    """Tokens per packed int64 key: the largest power of two m with (largest + 2)^m < 2^63."""
    m = 1
    while (2 * m) * np.log2(largest + 2) < 63:
        m *= 2
    return m


def _prefix_keys(seq: np.ndarray, m: int) -> np.ndarray:
    """(n,) int64 keys ordered as the suffixes' first m tokens; positions past the end count as 0."""
    key = np.zeros(len(seq), dtype=np.int64)
    base = int(seq.max()) + 2
    for j in range(min(m, len(seq))):  # (a sequence shorter than m: every key gets the same fewer digits)
        key *= base
        key[:len(seq) - j] += seq[j:] + 1
    return key


def _regroup(slots: np.ndarray, sorted_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slots of groups still holding > 1 suffix, the group-start slot of each sorted entry)."""
    is_start = np.ones(len(slots), dtype=bool)
    is_start[1:] = sorted_key[1:] != sorted_key[:-1]
    starts = np.flatnonzero(is_start)
    sizes = np.diff(np.append(starts, len(slots)))
    group_slot = np.repeat(slots[starts], sizes)
    return slots[np.repeat(sizes > 1, sizes)], group_slot


def _lcp(sa: np.ndarray, tables: list[np.ndarray], n: int) -> np.ndarray:
    """LCP of each suffix with its predecessor in SA, by binary lifting over the rank tables."""
    p, q = sa[:-1].copy(), sa[1:].copy()
    lcp = np.zeros(n - 1, dtype=np.int64)
    for level in range(len(tables) - 1, -1, -1):
        step, rank = 1 << level, tables[level]
        inside = (p + lcp + step <= n) & (q + lcp + step <= n)              # both have 2^level more tokens
        pi, qi = np.minimum(p + lcp, n - 1), np.minimum(q + lcp, n - 1)
        lcp += np.where(inside & (rank[pi] == rank[qi]), step, 0)
    return np.concatenate([[0], lcp])


def concatenate(docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(s, start of each document in s): documents with a distinct separator symbol after each one."""
    d = len(docs)
    lengths = np.array([len(x) for x in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    s = np.empty(int(lengths.sum()) + d, dtype=np.int64)
    for i, x in enumerate(docs):
        s[starts[i]:starts[i] + len(x)] = np.asarray(x, dtype=np.int64) + d  # tokens above the separators
        s[starts[i] + len(x)] = i                                            # σ_i = i, unique
    return s, starts


def repeated_mask(seq: np.ndarray, min_len: int, keep_first: bool = False) -> np.ndarray:
    """(n,) bool: tokens inside a window of `min_len` tokens that occurs at least twice in `seq`."""
    n = len(seq)
    if n == 0:
        return np.zeros(0, dtype=bool)
    sa, lcp = suffix_array(seq, lcp_cap=min_len)
    group = np.cumsum(lcp < min_len) - 1                  # SA runs whose suffixes share a min_len prefix
    repeated = np.bincount(group)[group] >= 2
    if keep_first:                                        # the leftmost copy of each window survives
        first = np.full(group[-1] + 1, n, dtype=np.int64)
        np.minimum.at(first, group, sa)
        repeated &= sa != first[group]
    starts = sa[repeated]
    cover = np.bincount(starts, minlength=n + 1) - np.bincount(starts + min_len, minlength=n + min_len + 1)[:n + 1]
    return np.cumsum(cover)[:n] > 0


def duplicate_spans(token_docs: list[np.ndarray], min_len: int = 50, keep_first: bool = False) -> list[np.ndarray]:
    """For each document, a bool mask of its tokens that belong to a repeated span of ≥ min_len tokens."""
    s, starts = concatenate(token_docs)
    mask = repeated_mask(s, min_len, keep_first)
    return [mask[start:start + len(x)] for start, x in zip(starts, token_docs)]


class _Tokens:
    """Text ↔ tokens for de-duplication: UTF-8 bytes, or a tokenizer's ids with character offsets."""

    def __init__(self, tokenizer: str):
        self.tok = None if tokenizer == "bytes" else load_tokenizer(tokenizer)

    def encode(self, text: str) -> tuple[np.ndarray, list | None]:
        if self.tok is None:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8), None
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return np.array(enc["input_ids"], dtype=np.int64), enc["offset_mapping"]

    def strike(self, text: str, offsets: list | None, removed: np.ndarray) -> str:
        """`text` without the removed tokens (a byte cut inside a character drops that character)."""
        if offsets is None:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[~removed].tobytes().decode("utf-8", "ignore")
        keep = np.ones(len(text), dtype=bool)
        for i in np.flatnonzero(removed):
            keep[offsets[i][0]:offsets[i][1]] = False
        return "".join(compress(text, keep.tolist()))


@dataclass
class SubstringDedupConfig:
    min_len: int = field(50, help="shortest repeated span to remove, in tokens (the paper: 50 GPT-2 tokens; "
                                  "as bytes, 50 is ~10 English words or ~17 Chinese characters)")
    tokenizer: str = field("bytes", help="'bytes' (UTF-8), or a tokenizer folder / model name whose tokens to use")
    keep_first: bool = field(False, help="keep the first copy of each repeated span (the paper removes all copies)")
    min_chars: int = field(20, help="drop documents this step leaves with fewer non-space characters than this")

    def __post_init__(self):
        if self.min_len < 2:
            raise LlmlabError(f"substring_dedup.min_len must be at least 2 tokens, got {self.min_len}")
        if self.min_chars < 0:
            raise LlmlabError(f"substring_dedup.min_chars must be 0 or more, got {self.min_chars}")


def dedup_substrings(texts: list[str], cfg: SubstringDedupConfig | None = None) -> list[str]:
    """Each text with its repeated spans of ≥ cfg.min_len tokens struck out."""
    cfg = cfg or SubstringDedupConfig()
    codec = _Tokens(cfg.tokenizer)
    encoded = [codec.encode(t) for t in texts]
    masks = duplicate_spans([ids for ids, _ in encoded], cfg.min_len, cfg.keep_first)
    return [codec.strike(t, offsets, m) if m.any() else t for t, (_, offsets), m in zip(texts, encoded, masks)]


class SubstringDedup(Step):
    """Strike repeated spans of ≥ min_len tokens (suffix array), then drop documents left too short."""
    name = "substring_dedup"
    Config = SubstringDedupConfig
    global_ = True

    def process(self, docs: Iterator[dict], log: StepLog) -> Iterator[dict]:
        docs = list(docs)  # the suffix array spans the whole corpus
        for doc, text in zip(docs, dedup_substrings([d["text"] for d in docs], self.cfg)):
            if text is not doc["text"]:  # only documents this step shortened can be too short because of it
                log.modified(doc, "chars_removed", len(doc["text"]) - len(text))
                doc = {**doc, "text": text}
                if len("".join(text.split())) < self.cfg.min_chars:
                    log.drop(doc, "too_short_after_substring_dedup")
                    continue
            yield doc


__all__ = ["suffix_array", "concatenate", "repeated_mask", "duplicate_spans",
           "SubstringDedupConfig", "dedup_substrings", "SubstringDedup"]

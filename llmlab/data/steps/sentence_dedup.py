"""Sentence-level de-duplication across documents: strike spans of sentences seen in an earlier document.

C. Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (T5/C4), JMLR 2020, https://arxiv.org/abs/1910.10683, §2.2: "we discarded all but
one of any three-sentence span occurring more than once in the data set"; datatrove's
SentenceDedup does the same with `n_sentences=3`.

A document is split into sentences (after . ! ? and the CJK 。！？；, or into lines with
`split: line`). Every window of `span` consecutive sentences is keyed by the hash of its
normalised text (NFKC, lowercase, whitespace collapsed); a window whose key occurred in an
earlier document is struck from this one, so the first document keeps its copy:

    remove sentence i of doc d  ⇔  ∃ window W ∋ i : key(W) ∈ ⋃_{d' < d} keys(d').

The default span is 3, as in C4 and datatrove, rather than single sentences: a single short
sentence ("Thank you.", "Step 1:") repeats across unrelated documents, three in a row rarely do.
Windows shorter than `min_chars` are ignored for the same reason; `span: 1` gives plain
sentence (or line) de-duplication. Repeats inside one document are left alone (that is a quality
signal, see the duplicate-line filters). Documents left shorter than `min_doc_chars` are dropped.
"""

import hashlib
import re
from dataclasses import dataclass
from typing import Iterator, Literal

from llmlab.config import field
from llmlab.data.steps.base import Step, StepLog
from llmlab.data.steps.exact_dedup import normalize
from llmlab.errors import LlmlabError

# a sentence ends after Western . ! ? (then whitespace) or the CJK full stops, which need no space
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])\s*|\n+")


def split_sentences(text: str, split: str = "sentence") -> list[str]:
    """The text's pieces, each keeping its trailing whitespace, so that ''.join(pieces) == text."""
    if split == "line":
        return text.splitlines(keepends=True)
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() > start:
            pieces.append(text[start:m.end()])
            start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _key(sentences: list[str]) -> tuple[bytes, int]:
    norm = normalize(" ".join(sentences))
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest(), len(norm)


class SentenceDeduper:
    """Feed documents in order; each comes back without the sentence spans seen in earlier documents."""

    def __init__(self, span: int = 3, min_chars: int = 30, split: str = "sentence"):
        self.span, self.min_chars, self.split = span, min_chars, split
        self.seen: set[bytes] = set()

    def __call__(self, text: str) -> tuple[str, int]:
        """(the text without repeated spans, the number of sentences removed)."""
        pieces = split_sentences(text, self.split)
        content = [i for i, p in enumerate(pieces) if p.strip()]   # blank lines are not sentences
        width = min(self.span, len(content))
        keys = []
        for w in range(len(content) - width + 1) if width else ():
            window = content[w:w + width]
            key, size = _key([pieces[i] for i in window])
            if size >= self.min_chars:
                keys.append((key, window))
        removed = {i for key, window in keys if key in self.seen for i in window}
        self.seen.update(key for key, _ in keys)  # after the look-ups: repeats within one document stay
        if not removed:
            return text, 0
        return "".join(p for i, p in enumerate(pieces) if i not in removed), len(removed)


@dataclass
class SentenceDedupConfig:
    span: int = field(3, help="sentences per compared window (C4 and datatrove: 3; 1: single sentences)")
    split: Literal["sentence", "line"] = field("sentence", help="split documents into sentences or lines")
    min_chars: int = field(30, help="windows shorter than this (normalised characters) are never removed")
    min_doc_chars: int = field(20, help="drop documents this step leaves with fewer non-space characters than this")

    def __post_init__(self):
        if self.span < 1:
            raise LlmlabError(f"sentence_dedup.span must be at least 1, got {self.span}")
        if self.min_chars < 0 or self.min_doc_chars < 0:
            raise LlmlabError("sentence_dedup.min_chars and min_doc_chars must be 0 or more")


class SentenceDedup(Step):
    """Strike sentence spans that occurred in an earlier document; drop documents left too short."""
    name = "sentence_dedup"
    Config = SentenceDedupConfig
    global_ = True

    def process(self, docs: Iterator[dict], log: StepLog) -> Iterator[dict]:
        dedup = SentenceDeduper(self.cfg.span, self.cfg.min_chars, self.cfg.split)
        for doc in docs:
            text, removed = dedup(doc["text"])
            if removed:  # only documents this step shortened can be too short because of it
                log.modified(doc, "sentences_removed", removed)
                doc = {**doc, "text": text}
                if len("".join(text.split())) < self.cfg.min_doc_chars:
                    log.drop(doc, "too_short_after_sentence_dedup")
                    continue
            yield doc


__all__ = ["split_sentences", "SentenceDeduper", "SentenceDedupConfig", "SentenceDedup"]

"""Exact de-duplication: keep the first document of each group whose normalised texts are equal.

Two documents are duplicates when their texts are equal after normalisation

    norm(t) = collapse_whitespace(lowercase(NFKC(t)))        [minus punctuation, if asked]

and only a 128-bit BLAKE2b digest of norm(t) is kept per document, so memory is 16 bytes a
document (a collision needs ~2^64 documents). NFKC folds full-width and compatibility forms
(ＡＢＣ → ABC, ﬁ → fi), which matters for Chinese web text where full-width Latin is common.
This is the cheapest of the de-duplication levels and usually runs first: it removes the copies
that MinHash-LSH would otherwise have to find.
"""

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterator

from llmlab.config import field
from llmlab.data.steps.base import Step, StepLog

_SPACE = re.compile(r"\s+")
# Chinese and Japanese are written without spaces: each ideograph or kana is one token, as in
# character-level shingling of Chinese text; every other run of word characters is one token.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")


def normalize(text: str, strip_punctuation: bool = False) -> str:
    """NFKC, lowercase, whitespace runs to one space, optionally without punctuation (Unicode P*)."""
    text = unicodedata.normalize("NFKC", text).lower()
    if strip_punctuation:
        text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return _SPACE.sub(" ", text).strip()


def words(text: str) -> list[str]:
    """Word tokens of normalised text: runs of letters/digits, and single CJK characters."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())  # whitespace needs no collapsing here


def text_digest(text: str, strip_punctuation: bool = False) -> bytes:
    return hashlib.blake2b(normalize(text, strip_punctuation).encode("utf-8"), digest_size=16).digest()


def exact_duplicates(texts, strip_punctuation: bool = False) -> list[int | None]:
    """For each text, the index of the earlier text it duplicates, or None for a first occurrence."""
    first: dict[bytes, int] = {}
    out = []
    for i, text in enumerate(texts):
        key = text_digest(text, strip_punctuation)
        out.append(first.get(key))
        first.setdefault(key, i)
    return out


@dataclass
class ExactDedupConfig:
    strip_punctuation: bool = field(False, help="ignore punctuation when comparing texts")


class ExactDedup(Step):
    """Drop every document whose normalised text equals an earlier document's."""
    name = "exact_dedup"
    Config = ExactDedupConfig
    global_ = True

    def process(self, docs: Iterator[dict], log: StepLog) -> Iterator[dict]:
        seen: set[bytes] = set()
        for doc in docs:
            key = text_digest(doc["text"], self.cfg.strip_punctuation)
            if key in seen:
                log.drop(doc, "exact_duplicate")
                continue
            seen.add(key)
            yield doc


__all__ = ["normalize", "words", "text_digest", "exact_duplicates", "ExactDedupConfig", "ExactDedup"]

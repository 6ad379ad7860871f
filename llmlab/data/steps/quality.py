"""Heuristic quality filters: Gopher's quality and repetition rules, C4's line rules, keyword blocklists.

Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher",
appendix A.1.1, https://arxiv.org/abs/2112.11446 — a document is kept only if
    50 ≤ words ≤ 100 000,   3 ≤ mean word length ≤ 10,   (#'s + ellipses) / words < 0.1,
    bullet-start lines ≤ 90 %,   ellipsis-end lines ≤ 30 %,   ≥ 80 % of words have an alphabetic character,
    and ≥ 2 of the stop words {the, be, to, of, and, that, have, with} occur;
and (table A1) its repetition stays below: duplicate lines 30 % (of lines) and 20 % (of characters),
duplicate paragraphs 30 % / 20 %, the most frequent 2-, 3-, 4-gram 20 / 18 / 16 % of characters,
characters inside duplicated 5..10-grams 15 / 14 / 13 / 12 / 11 / 10 %.
The n-gram fractions follow the paper's wording — characters of *all* occurrences of a repeated n-gram,
overlaps counted once, over the characters of all words — so they are stricter than datatrove's, which
counts only the second and later occurrences.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (C4),
section 2.2, https://arxiv.org/abs/1910.10683 — keep only lines that end in terminal punctuation and have at
least 5 words; remove lines mentioning javascript or a cookie/terms-of-use policy, and citation markers;
drop pages containing "lorem ipsum" or "{", and pages left with fewer than 3 sentences.

Chinese has no spaces, so for Chinese documents (doc["language"] == "zh", or mostly CJK text when untagged,
or `lang: zh`) each CJK character counts as a word, CJK punctuation (。！？…) ends sentences and lines,
Chinese stop words replace Gopher's, the mean-word-length rule is skipped, and repetition n-grams are of
characters with n doubled (`zh_ngram_scale`: on alpaca-zh outputs that passed the quality rules, character
n-grams with Gopher's n drop 17 % of documents, doubled n 4 %, as many as Gopher's rules drop of alpaca's English). Every rule's drop reason is
its own name, e.g. `gopher_min_words`, `gopher_dup_5gram`, `c4_too_few_sentences`, `blocklist`.
"""

import functools
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from llmlab.config import field
from llmlab.data.steps.base import Filter, Step, StepLog
from llmlab.data.text import lines
from llmlab.errors import LlmlabError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNITS_ZH = re.compile(rf"[{CJK}]|[^\s{CJK}\u3000-\u303f\uff00-\uffef]+")  # one CJK character, or a non-CJK word
_CJK_CHAR = re.compile(rf"[{CJK}]")
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "◦", "‣", "-", "*", "–", "·")
ELLIPSES = ("...", "…")
TERMINAL = {"en": (".", "!", "?", '"', "”"), "zh": (".", "!", "?", '"', "”", "。", "！", "？", "…", "」", "』")}
_SENTENCE_END = {"en": re.compile(r"[.!?]+[\"”']?(?=\s|$)"), "zh": re.compile(r"[.!?]+[\"”']?(?=\s|$)|[。！？]+[”」』]?")}
_PUNCT = string.punctuation + "“”‘’"
_CITATION = re.compile(r"\[\d+\]|\[citation needed\]|\[edit\]", re.IGNORECASE)


@functools.lru_cache(maxsize=None)
def word_list(path: str) -> tuple[str, ...]:
    """Non-empty, non-comment lines of a word list (bundled in llmlab/data/assets/ or a user's file)."""
    file = Path(path) if Path(path).is_file() else ASSETS / path
    if not file.is_file():
        raise LlmlabError(f"word list {path} not found; give a text file with one entry per line")
    entries = (ln.strip() for ln in lines(file.read_text(encoding="utf-8")))
    return tuple(ln for ln in entries if ln and not ln.startswith("#"))


def text_lang(doc: dict, option: str) -> str:
    """'zh' or 'en' (space-separated): the option if set, else the language tag, else the share of CJK characters."""
    if option != "auto":
        return option
    tag = str(doc.get("language") or "")
    if tag:
        return "zh" if tag.startswith("zh") else "en"
    text = doc["text"][:2000]
    return "zh" if len(_CJK_CHAR.findall(text)) > 0.3 * len(text.replace(" ", "") or " ") else "en"


def words(text: str, lang: str) -> list[str]:
    """Whitespace tokens, or for Chinese one token per CJK character and per non-CJK word."""
    return _UNITS_ZH.findall(text) if lang == "zh" else text.split()


# ---- Gopher quality ----

@dataclass
class GopherQualityConfig:
    min_words: int = field(50, help="fewest words (Chinese: characters)")
    max_words: int = field(100000, help="most words (Chinese: characters)")
    min_mean_word_length: float = field(3.0, help="shortest mean word length (skipped for Chinese)")
    max_mean_word_length: float = field(10.0, help="longest mean word length (skipped for Chinese)")
    max_symbol_word_ratio: float = field(0.1, help="most '#' and ellipses per word")
    max_bullet_lines_ratio: float = field(0.9, help="most lines starting with a bullet point")
    max_ellipsis_lines_ratio: float = field(0.3, help="most lines ending in an ellipsis")
    min_alpha_words_ratio: float = field(0.8, help="fewest words with an alphabetic character")
    min_stop_words: int = field(2, help="fewest stop words present (Chinese: occurrences)")
    stop_words: str = field("", help="a stop-word file; default the bundled stopwords_<lang>.txt")
    lang: Literal["auto", "en", "zh"] = field("auto", help="auto: by doc['language'] or the share of CJK text")

    def __post_init__(self):
        if not 0 <= self.min_words <= self.max_words:
            raise LlmlabError(f"gopher_quality: need 0 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if self.stop_words:
            word_list(self.stop_words)


def gopher_quality(text: str, lang: str, cfg: GopherQualityConfig) -> Iterator[str]:
    """The names of the Gopher quality rules `text` fails, in order, computed lazily (the step takes the first)."""
    tokens = words(text, lang)
    n = max(len(tokens), 1)
    if len(tokens) < cfg.min_words:
        yield "gopher_min_words"
    if len(tokens) > cfg.max_words:
        yield "gopher_max_words"
    if lang != "zh" and not cfg.min_mean_word_length <= sum(map(len, tokens)) / n <= cfg.max_mean_word_length:
        yield "gopher_mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / n > cfg.max_symbol_word_ratio:
        yield "gopher_symbol_ratio"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if sum(ln.startswith(BULLETS) for ln in lines) > cfg.max_bullet_lines_ratio * len(lines):
        yield "gopher_bullet_lines"
    if sum(ln.endswith(ELLIPSES) for ln in lines) > cfg.max_ellipsis_lines_ratio * len(lines):
        yield "gopher_ellipsis_lines"
    if sum(any(c.isalpha() for c in t) for t in tokens) < cfg.min_alpha_words_ratio * len(tokens):
        yield "gopher_alpha_words"
    stop = word_list(cfg.stop_words or f"stopwords_{lang}.txt")
    found = sum(text.count(w) for w in stop) if lang == "zh" else len({w.lower().strip(_PUNCT) for w in tokens} & set(stop))
    if found < cfg.min_stop_words:
        yield "gopher_stop_words"


class GopherQuality(Filter):
    """Gopher's quality rules: word counts and lengths, symbols, bullets, ellipses, alphabetic words, stop words."""
    name = "gopher_quality"
    Config = GopherQualityConfig

    def filter(self, doc: dict):
        reason = next(gopher_quality(doc["text"], text_lang(doc, self.cfg.lang), self.cfg), None)
        return (False, reason) if reason else True


# ---- Gopher repetition ----

@dataclass
class GopherRepetitionConfig:
    max_dup_line_frac: float = field(0.30, help="most duplicate lines, as a fraction of lines")
    max_dup_para_frac: float = field(0.30, help="most duplicate paragraphs, as a fraction of paragraphs")
    max_dup_line_char_frac: float = field(0.20, help="most characters in duplicate lines")
    max_dup_para_char_frac: float = field(0.20, help="most characters in duplicate paragraphs")
    max_top_ngram_frac: dict = field({2: 0.20, 3: 0.18, 4: 0.16}, help="n: most characters in the top n-gram")
    max_dup_ngram_frac: dict = field({5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
                                     help="n: most characters in duplicated n-grams")
    zh_ngram_scale: float = field(2.0, help="Chinese n-grams are of characters: n is multiplied by this")
    lang: Literal["auto", "en", "zh"] = field("auto", help="auto: by doc['language'] or the share of CJK text")

    def __post_init__(self):
        for key in ("max_top_ngram_frac", "max_dup_ngram_frac"):
            table = getattr(self, key)
            if not all(isinstance(n, int) and n > 0 and 0 <= v <= 1 for n, v in table.items()):
                raise LlmlabError(f"gopher_repetition.{key} maps n-gram sizes to fractions in [0, 1], got {table}")


def duplicate_fractions(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier part, fraction of characters in those repeats)."""
    seen, dup, dup_chars = set(), 0, 0
    for p in parts:
        if p in seen:
            dup, dup_chars = dup + 1, dup_chars + len(p)
        seen.add(p)
    return dup / max(len(parts), 1), dup_chars / max(sum(map(len, parts)), 1)


def top_ngram_frac(tokens: list[str], n: int) -> float:
    """Characters covered by the most frequent n-gram (if it repeats) over the characters of all words."""
    grams = Counter(zip(*(tokens[i:] for i in range(n))))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return 0.0 if count < 2 else count * sum(map(len, gram)) / max(sum(map(len, tokens)), 1)


def dup_ngram_frac(tokens: list[str], n: int) -> float:
    """Characters of words inside any occurrence of a repeated n-gram (overlaps once) over all word characters."""
    grams = list(zip(*(tokens[i:] for i in range(n))))
    counts = Counter(grams)
    covered = [False] * len(tokens)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = [True] * n
    return sum(len(t) for t, c in zip(tokens, covered) if c) / max(sum(map(len, tokens)), 1)


def gopher_repetition(text: str, lang: str, cfg: GopherRepetitionConfig) -> Iterator[str]:
    """The names of the Gopher repetition rules `text` fails, in order, computed lazily (the step takes the first)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    para_frac, para_chars = duplicate_fractions(paragraphs)
    line_frac, line_chars = duplicate_fractions(lines)
    for value, limit, reason in ((line_frac, cfg.max_dup_line_frac, "gopher_dup_line_frac"),
                                 (para_frac, cfg.max_dup_para_frac, "gopher_dup_para_frac"),
                                 (line_chars, cfg.max_dup_line_char_frac, "gopher_dup_line_char_frac"),
                                 (para_chars, cfg.max_dup_para_char_frac, "gopher_dup_para_char_frac")):
        if value > limit:
            yield reason
    tokens = words(text, lang)
    scale = cfg.zh_ngram_scale if lang == "zh" else 1.0  # a Chinese word is ~2 characters
    for n, limit in sorted(cfg.max_top_ngram_frac.items()):
        if top_ngram_frac(tokens, round(n * scale)) > limit:
            yield f"gopher_top_{n}gram"
    for n, limit in sorted(cfg.max_dup_ngram_frac.items()):
        frac = dup_ngram_frac(tokens, round(n * scale))
        if frac > limit:
            yield f"gopher_dup_{n}gram"
        elif frac == 0:  # no repeated n-gram means no repeated longer one: most clean documents stop here
            return


class GopherRepetition(Filter):
    """Gopher's repetition rules: duplicate lines and paragraphs, top n-grams, duplicated n-grams."""
    name = "gopher_repetition"
    Config = GopherRepetitionConfig

    def filter(self, doc: dict):
        reason = next(gopher_repetition(doc["text"], text_lang(doc, self.cfg.lang), self.cfg), None)
        return (False, reason) if reason else True


# ---- C4 ----

@dataclass
class C4RulesConfig:
    min_words_per_line: int = field(5, help="remove lines with fewer words (Chinese: characters)")
    min_sentences: int = field(3, help="drop pages left with fewer sentences")
    max_word_length: int = field(1000, help="remove lines with a longer word")
    remove_javascript_lines: bool = field(True, help="remove lines mentioning javascript")
    remove_policy_lines: bool = field(True, help="remove lines with the phrases in assets/c4_policy.txt")
    remove_citations: bool = field(True, help="remove markers such as [1] and [citation needed]")
    drop_lorem_ipsum: bool = field(True, help="drop pages containing 'lorem ipsum'")
    drop_curly_bracket: bool = field(True, help="drop pages containing '{' (code)")
    lang: Literal["auto", "en", "zh"] = field("auto", help="auto: by doc['language'] or the share of CJK text")


def c4_clean(text: str, lang: str, cfg: C4RulesConfig, changes: Counter) -> tuple[str | None, str | None]:
    """(cleaned text, None), or (None, the rule that drops the page); removed lines are counted in `changes`."""
    if cfg.drop_lorem_ipsum and "lorem ipsum" in text.lower():
        return None, "c4_lorem_ipsum"
    if cfg.drop_curly_bracket and "{" in text:
        return None, "c4_curly_bracket"
    kept, policy = [], word_list("c4_policy.txt")
    for line in text.splitlines():
        if cfg.remove_citations:
            line, n = _CITATION.subn("", line)
            changes["c4_citation"] += n
        line = line.strip()
        if not line:
            continue
        tokens, lower = words(line, lang), line.lower()
        rule = ("c4_line_long_word" if any(len(t) > cfg.max_word_length for t in tokens) else
                "c4_line_no_terminal_punct" if not line.endswith(TERMINAL[lang]) else
                "c4_line_few_words" if len(tokens) < cfg.min_words_per_line else
                "c4_line_javascript" if cfg.remove_javascript_lines and "javascript" in lower else
                "c4_line_policy" if cfg.remove_policy_lines and any(p in lower for p in policy) else None)
        if rule:
            changes[rule] += 1
        else:
            kept.append(line)
    cleaned = "\n".join(kept)
    if len(_SENTENCE_END[lang].findall(cleaned)) < cfg.min_sentences:
        return None, "c4_too_few_sentences"
    return cleaned, None


class C4Rules(Step):
    """C4's rules: keep punctuated lines of 5+ words, drop lorem ipsum, code and pages under 3 sentences."""
    name = "c4_rules"
    Config = C4RulesConfig

    def process(self, docs: Iterator[dict], log: StepLog) -> Iterator[dict]:
        for doc in docs:
            changes = Counter()
            text, reason = c4_clean(doc["text"], text_lang(doc, self.cfg.lang), self.cfg, changes)
            if reason:
                log.drop(doc, reason)
                continue
            for what, n in changes.items():
                log.modified(doc, what, n)
            doc["text"] = text
            yield doc


# ---- keyword blocklist ----

@dataclass
class BlocklistConfig:
    words: list[str] = field([], help="blocked words or phrases, inline")
    files: list[str] = field([], help="files of blocked words, one per line; default the bundled blocklist_en/zh.txt")
    min_hits: int = field(1, help="drop a document with at least this many matches")

    def __post_init__(self):
        if self.min_hits < 1:
            raise LlmlabError(f"blocklist.min_hits must be at least 1, got {self.min_hits}")
        for f in self.files:
            word_list(f)


def blocklist_pattern(terms) -> re.Pattern:
    """One case-insensitive regex: whole-word matches for spaced scripts, substrings for CJK terms."""
    cjk = [re.escape(t) for t in terms if _CJK_CHAR.search(t)]
    spaced = [re.escape(t) for t in terms if not _CJK_CHAR.search(t)]
    parts = ([rf"(?<!\w)(?:{'|'.join(sorted(spaced, key=len, reverse=True))})(?!\w)"] if spaced else []) + cjk
    return re.compile("|".join(parts) or r"(?!x)x", re.IGNORECASE)


class Blocklist(Filter):
    """Drop documents that contain blocked words or phrases (word-boundary matches; substrings for CJK)."""
    name = "blocklist"
    Config = BlocklistConfig

    def __init__(self, cfg: BlocklistConfig):
        super().__init__(cfg)
        files = cfg.files or ([] if cfg.words else ["blocklist_en.txt", "blocklist_zh.txt"])
        self.pattern = blocklist_pattern([*cfg.words, *(w for f in files for w in word_list(f))])

    def filter(self, doc: dict) -> bool:
        text = doc["text"]
        hits = len(self.pattern.findall(text)) if self.cfg.min_hits > 1 else int(bool(self.pattern.search(text)))
        return hits < self.cfg.min_hits  # dropped under the step's name, "blocklist"

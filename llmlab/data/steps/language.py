"""Language identification and filtering with langid.py's naive Bayes model (py3langid; model in the wheel).

Lui & Baldwin 2012, "langid.py: An Off-the-shelf Language Identification Tool", https://aclanthology.org/P12-3005
A multinomial naive Bayes over byte n-gram features f(x) (n = 1..4, selected for being informative across
languages rather than across domains), over 97 languages:

    P(lang | x) = softmax_lang( (log P(lang) + Σ_f log(1 + count_f(x)) · log P(f | lang)) / √|x| )

normalised to probabilities (py3langid's `norm_probs`; the 1/√bytes temperature keeps the confidence of long
and short texts comparable). The step adds doc["language"] and doc["language_score"], and drops documents
whose language is not in `languages` (reason `language_not_allowed`) or whose confidence is below
`threshold` (reason `language_low_score`). Scoring costs O(bytes), so only the first `max_chars` are read.
"""

import functools
from dataclasses import dataclass

from llmlab.config import field
from llmlab.data.steps.base import Filter
from llmlab.errors import LlmlabError, closest


@functools.lru_cache(maxsize=1)
def identifier():
    """The langid.py model, loaded once per process, with probabilities normalised over languages."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, max_chars: int = 10000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language of `text`."""
    lang, score = identifier().classify(text[:max_chars])
    return lang, float(score)


@dataclass
class LanguageConfig:
    languages: list[str] = field([], help="keep only these ISO 639-1 codes, e.g. [en, zh]; empty keeps all")
    threshold: float = field(0.65, help="drop documents whose top language probability is below this")
    max_chars: int = field(10000, help="identify the language from the first this many characters")

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise LlmlabError(f"language.threshold is a probability in [0, 1], got {self.threshold}")
        if self.max_chars < 1:
            raise LlmlabError(f"language.max_chars must be at least 1, got {self.max_chars}")
        labels = identifier().labels
        for code in self.languages:
            if code not in labels:
                raise LlmlabError(f"language.languages: '{code}' is not a language the model knows"
                                  f"{closest(code, labels)}; use ISO 639-1 codes such as en, zh, de")


class Language(Filter):
    """Tag each document with its language and confidence; keep the allowed languages above the threshold."""
    name = "language"
    Config = LanguageConfig

    def filter(self, doc: dict):
        lang, score = identify(doc["text"], self.cfg.max_chars)
        doc["language"], doc["language_score"] = lang, round(score, 4)
        if self.cfg.languages and lang not in self.cfg.languages:
            return False, "language_not_allowed"
        if score < self.cfg.threshold:
            return False, "language_low_score"
        return True

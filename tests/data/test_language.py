"""Language identification (py3langid, model inside the wheel) and the `language` filter step."""
from collections import Counter

import pytest

from llmlab.data.pipeline import make_step
from llmlab.data.steps.base import StepLog
from llmlab.data.steps.language import identify
from llmlab.errors import LlmlabError

TEXTS = {
    "en": "The committee will publish its final report on the new railway line early next spring.",
    "zh": "委员会将在明年春天公布关于新铁路线的最终报告，届时市民可以在网上查阅。",
    "de": "Der Ausschuss wird seinen Abschlussbericht über die neue Bahnstrecke im nächsten Frühjahr veröffentlichen.",
    "fr": "Le comité publiera son rapport final sur la nouvelle ligne de chemin de fer au printemps prochain.",
    "ja": "委員会は来年の春に新しい鉄道路線に関する最終報告書を公表する予定です。",
}


@pytest.mark.parametrize("lang", TEXTS)
def test_identifies_languages_with_normalised_confidence(lang):
    found, score = identify(TEXTS[lang])
    assert found == lang and 0.9 < score <= 1.0


def test_step_tags_and_filters_by_allow_list_and_threshold():
    step, log = make_step("language", {"languages": ["en", "zh"], "threshold": 0.8}), StepLog("language")
    docs = [{"id": k, "text": v} for k, v in TEXTS.items()] + [{"id": "short", "text": "Thank you"}]
    kept = list(step.process(iter(docs), log))
    assert [d["id"] for d in kept] == ["en", "zh"]
    assert kept[0]["language"] == "en" and kept[0]["language_score"] > 0.9
    assert log.drops == Counter(language_not_allowed=3, language_low_score=1)
    assert log.samples["language_low_score"][0]["id"] == "short"


def test_empty_allow_list_keeps_every_language():
    step = make_step("language", {"threshold": 0.0})
    assert len(list(step.process(iter([{"id": k, "text": v} for k, v in TEXTS.items()]), StepLog("x")))) == 5


def test_bad_options():
    with pytest.raises(LlmlabError, match="'english' is not a language"):
        make_step("language", {"languages": ["english"]})
    with pytest.raises(LlmlabError, match="threshold"):
        make_step("language", {"threshold": 1.5})

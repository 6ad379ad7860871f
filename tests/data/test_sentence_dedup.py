import pytest

from llmlab.data.pipeline import make_step
from llmlab.data.steps.base import StepLog
from llmlab.data.steps.sentence_dedup import SentenceDeduper, split_sentences
from llmlab.errors import LlmlabError


def test_split_sentences_keeps_the_text_and_knows_cjk_punctuation():
    text = "First one. Second one!  Third? 第一句。第二句！第三句？\nA line without end"
    pieces = split_sentences(text)
    assert "".join(pieces) == text
    assert [p.strip() for p in pieces] == ["First one.", "Second one!", "Third?", "第一句。", "第二句！", "第三句？",
                                           "A line without end"]
    assert split_sentences("a\nb\n", "line") == ["a\n", "b\n"]
    assert split_sentences("Pi is 3.14 exactly.") == ["Pi is 3.14 exactly."]


S = ["The committee met on Tuesday to discuss the budget.", "Several members raised concerns about costs.",
     "A final decision was postponed until next month.", "Local residents were invited to comment.",
     "The weather was unusually warm for the season.", "Children played in the park all afternoon."]


def test_three_sentence_span_seen_earlier_is_removed_from_later_documents_only():
    dedup = SentenceDeduper(span=3, min_chars=30)
    first = " ".join(S[:4])
    assert dedup(first) == (first, 0)
    text, removed = dedup(S[4] + " " + " ".join(S[0:3]) + " " + S[5])
    assert removed == 3 and text == S[4] + " " + S[5]
    # two shared sentences in a row are not a three-sentence span: kept
    assert dedup(S[5] + " " + S[1] + " " + S[2] + " Something new happened here today.")[1] == 0


def test_single_sentences_with_minimum_length():
    dedup = SentenceDeduper(span=1, min_chars=20)
    dedup("Thank you. " + S[0])
    text, removed = dedup("Thank you. " + S[0] + " " + S[1])
    assert removed == 1 and text == "Thank you. " + S[1]            # "thank you." is shorter than 20
    assert dedup("这个重复的句子在今天的这篇文章里第一次出现了。新的内容。")[1] == 0
    assert dedup("别的开头。这个重复的句子在今天的这篇文章里第一次出现了。")[0] == "别的开头。"  # no space after 。


def test_normalisation_and_within_document_repeats():
    dedup = SentenceDeduper(span=1, min_chars=10)
    dedup(S[0] + " " + S[0])                                          # repeats inside one document stay
    assert dedup(S[0].upper().replace(" ", "   "))[1] == 1            # case and spacing do not matter


def test_step_removes_and_drops():
    docs = [{"id": "a", "text": " ".join(S[:3])}, {"id": "b", "text": " ".join(S[:3]) + " Ok."},
            {"id": "c", "text": " ".join(S[:4])}, {"id": "d", "text": "Hi."}]
    step, log = make_step("sentence_dedup", {"span": 3}), StepLog("sentence_dedup")
    out = list(step.process(iter(docs), log))
    assert [(d["id"], d["text"]) for d in out] == [("a", docs[0]["text"]), ("c", S[3]), ("d", "Hi.")]
    assert log.drops == {"too_short_after_sentence_dedup": 1} and log.changes["sentences_removed"] == 6
    with pytest.raises(LlmlabError, match="span"):
        make_step("sentence_dedup", {"span": 0})

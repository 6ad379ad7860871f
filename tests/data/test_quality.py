"""Gopher quality and repetition rules, C4 rules and blocklists: each hand-built document trips exactly one rule."""
from collections import Counter

import pytest

from llmlab.data.pipeline import make_step
from llmlab.data.steps import quality as q
from llmlab.data.steps.base import StepLog

EN = """The river town grew slowly during the nineteenth century, and its people learned to live with the seasons.
Farmers brought grain to the mill each autumn, while traders arrived by boat with cloth, salt and iron tools.
A small school opened near the church in 1852, and the first teacher kept a careful diary of her pupils.

Today the old mill is a museum that shows how water once powered every part of local life.
Visitors can walk along the canal, read letters written by millers, and watch the great wheel turn again."""

ZH = """这座小城位于长江下游，历史可以追溯到一千多年前的唐代。
城里的老街保存得很好，青石板路两旁是各式各样的传统店铺。
每到春天，河边的柳树发出新芽，许多游客专程来这里拍照。

当地人喜欢在清晨喝茶，茶馆里总是坐满了聊天的老人。
近年来，政府修复了古城墙，并且建成了一座介绍地方文化的博物馆。"""

NO_STOP_WORDS = """Rain fell across northern hills while farmers waited inside warm kitchens.
Children played games near old stone walls, laughing loudly until dusk arrived.
Merchants counted coins, sold bread, mended boots, carried lanterns through narrow streets.
Evening brought music from taverns; travellers rested beside fires, telling stories about distant cities.
Morning returned quietly. Bakers opened shutters early, pouring flour into wooden bowls."""

ZH_NO_STOP_WORDS = """春暖花开，鸟语花香，风和日丽，万紫千红，山清水秀。
湖光山色，桃红柳绿，莺歌燕舞，晨钟暮鼓，渔舟唱晚。
秋高气爽，层林尽染，五谷丰登，硕果累累，瓜果飘香。"""


def quality(text, lang="en", **kw):
    return list(q.gopher_quality(text, lang, q.GopherQualityConfig(**kw)))


def repetition(text, lang="en", **kw):
    return list(q.gopher_repetition(text, lang, q.GopherRepetitionConfig(**kw)))


def lines(text):
    return text.splitlines()


def test_clean_documents_pass_every_rule():
    for text, lang in ((EN, "en"), (ZH, "zh")):
        assert quality(text, lang) == [] and repetition(text, lang) == []
        assert q.c4_clean(text, lang, q.C4RulesConfig(), Counter())[1] is None


@pytest.mark.parametrize("text, rule", [
    (lines(EN)[0], "gopher_min_words"),
    ((EN + "\n") * 1076, "gopher_max_words"),
    (" ".join(w * 3 for w in EN.split()) + "\nthe and of", "gopher_mean_word_length"),
    ("we go to the sea, and I do not see it as it is.\n" * 6, "gopher_mean_word_length"),
    (EN + "\n#history #travel #mill #river #museum #canal #school #autumn #boat #salt #wheel", "gopher_symbol_ratio"),
    ("\n".join("• " + ln for ln in lines(EN) if ln), "gopher_bullet_lines"),
    ("\n".join(ln + ("..." if i < 2 else "") for i, ln in enumerate(lines(EN))), "gopher_ellipsis_lines"),
    (EN + "\n" + " ".join(str(1800 + i) for i in range(26)), "gopher_alpha_words"),
    (NO_STOP_WORDS, "gopher_stop_words"),
])
def test_each_gopher_quality_rule_alone(text, rule):
    assert quality(text) == [rule]


@pytest.mark.parametrize("text, rule", [
    (lines(ZH)[0], "gopher_min_words"),
    (ZH_NO_STOP_WORDS, "gopher_stop_words"),
    ("\n".join("• " + ln for ln in lines(ZH) if ln), "gopher_bullet_lines"),
    ("\n".join(ln + ("……" if i < 2 else "") for i, ln in enumerate(lines(ZH))), "gopher_ellipsis_lines"),
    (ZH + "\n" + " ".join(str(1800 + i) for i in range(40)), "gopher_alpha_words"),
])
def test_chinese_variant_counts_characters(text, rule):
    assert quality(text, "zh") == [rule]
    # counted as space-separated words, a Chinese line is a handful of "words": far below 50
    assert "gopher_min_words" in quality(ZH, "en")


def _sentences(phrase: str, n: int, filler: int) -> str:
    """n lines that each use `phrase` in a different context, padded with `filler` unique words per line."""
    subjects = "Anna Boris Chen Dara Emil Fatima Goran Hana Ivan Jun Kofi Lena Malik Nora Omar Priya".split()
    verbs = ("visited praised left painted described photographed toured studied mapped loved "
             "sketched filmed admired crossed reached entered").split()
    ends = ("yesterday recently twice happily alone again briefly often early slowly proudly gladly "
            "quietly bravely calmly eagerly").split()
    pad = iter(f"word{i}x" for i in range(10 ** 4))
    return "\n".join(f"{subjects[i]} {verbs[i]} {phrase} {ends[i]} " + " ".join(next(pad) for _ in range(filler)) + "."
                     for i in range(n))


def test_each_gopher_repetition_rule_alone():
    en = lines(EN)
    base_para = [", ".join(en[:2]), ", ".join(en[2:4])]
    cases = {
        "gopher_dup_line_frac": "\n".join(x for ln in en for x in ([ln, "Read more."] if ln else [ln])),
        "gopher_dup_para_frac": "\n\n".join(["\n".join(p.split(", ")) for p in base_para] + ["Share."] * 3),
        "gopher_dup_line_char_frac": EN + "\n" + "QmFzZTY0" * 30 + "\nThe end.\n" + "QmFzZTY0" * 30,
        "gopher_dup_para_char_frac": "\n\n".join(["\n".join(en[:3]), "Note:\n" + " " * 300 + "end.",
                                                  "\n".join(en[4:]), "Note:\n" + " " * 300 + "end."]),
        "gopher_top_2gram": _sentences("New York", 15, 0),
        "gopher_top_3gram": _sentences("New York City", 15, 3),
        "gopher_top_4gram": _sentences("New York City Hall", 15, 6),
        "gopher_dup_5gram": EN + "\nAnna saw the ancient limestone watermill wheelhouse today."
                                 "\nBoris fixed the ancient limestone watermill wheelhouse twice."
                                 "\nChen painted the ancient limestone watermill wheelhouse again.",
        "gopher_dup_10gram": _sentences("in", 14, 5) + "\nalpha beta gamma delta epsilon zeta eta theta iota kappa"
                                                    "\nalpha beta gamma delta epsilon zeta eta theta iota kappa",
    }
    for rule, text in cases.items():
        assert repetition(text) == [rule], rule


def test_repetition_measures():
    assert q.duplicate_fractions(["ab", "c", "ab", "ab"]) == (0.5, 4 / 7)
    tokens = "a b c a b c x".split()
    assert q.top_ngram_frac(tokens, 3) == pytest.approx(6 / 7)  # "a b c" twice
    assert q.dup_ngram_frac(tokens, 3) == pytest.approx(6 / 7)  # both occurrences, overlaps once
    assert q.dup_ngram_frac("a b c d".split(), 2) == 0.0


def test_chinese_repetition_uses_character_ngrams():
    text = "\n".join(f"第{i}段：人工智能正在改变{w}。" for i, w in enumerate("医疗教育金融交通农业制造零售能源"))
    assert "gopher_top_2gram" in repetition(text, "zh")  # "人工智能" is a character 4-gram (2 × zh_ngram_scale)
    assert "gopher_top_2gram" not in repetition(text, "zh", zh_ngram_scale=1.0, max_top_ngram_frac={4: 1.0})


def test_c4_line_rules_and_page_rules():
    extra = ["Click here", "Too short.", "Please enable JavaScript to see all the pictures on this page.",
             "By using this site you agree to our privacy policy and terms.",
             "The canal was dug in 1790 by hand and finished in three years.[1]",
             "This line has a " + "x" * 1001 + " very long word in it."]
    changes = Counter()
    text, reason = q.c4_clean(EN + "\n" + "\n".join(extra), "en", q.C4RulesConfig(), changes)
    assert reason is None
    assert text == "\n".join([ln for ln in lines(EN) if ln] + ["The canal was dug in 1790 by hand and finished in three years."])
    assert changes == Counter(c4_line_no_terminal_punct=1, c4_line_few_words=1, c4_line_javascript=1,
                              c4_line_policy=1, c4_citation=1, c4_line_long_word=1)
    for add, rule in (("Lorem ipsum dolor sit amet, consectetur adipiscing elit.", "c4_lorem_ipsum"),
                      ("In code we write function f() { return 1; } often.", "c4_curly_bracket")):
        assert q.c4_clean(EN + "\n" + add, "en", q.C4RulesConfig(), Counter())[1] == rule
    assert q.c4_clean("\n".join(lines(EN)[:2]), "en", q.C4RulesConfig(), Counter())[1] == "c4_too_few_sentences"


def test_c4_chinese_punctuation_and_character_counts():
    changes = Counter()
    text, reason = q.c4_clean(ZH + "\n好的。\n没有句号的一行文字内容", "zh", q.C4RulesConfig(), changes)
    assert reason is None and text == "\n".join(ln for ln in lines(ZH) if ln)
    assert changes == Counter(c4_line_few_words=1, c4_line_no_terminal_punct=1)
    # read as English, no Chinese line ends in . ! ? so the page loses every line
    assert q.c4_clean(ZH, "en", q.C4RulesConfig(), Counter())[1] == "c4_too_few_sentences"


def test_language_is_chosen_per_document():
    assert q.text_lang({"text": EN}, "auto") == "en" and q.text_lang({"text": ZH}, "auto") == "zh"
    assert q.text_lang({"text": EN, "language": "zh"}, "auto") == "zh"
    assert q.text_lang({"text": ZH}, "en") == "en"
    step, log = make_step("gopher_quality"), StepLog("gopher_quality")
    kept = list(step.process(iter([{"id": "a", "text": EN}, {"id": "b", "text": ZH}, {"id": "c", "text": lines(ZH)[0]}]), log))
    assert [d["id"] for d in kept] == ["a", "b"] and log.drops == Counter(gopher_min_words=1)


def test_blocklist_matches_whole_words_and_cjk_substrings():
    step, log = make_step("blocklist", {"words": ["ass", "赌博"]}), StepLog("blocklist")
    docs = [{"id": "1", "text": "A class assignment on mass transit."}, {"id": "2", "text": "Kick ASS, he said."},
            {"id": "3", "text": "网络赌博是违法的。"}, {"id": "4", "text": "Assessing the bass."}]
    assert [d["id"] for d in step.process(iter(docs), log)] == ["1", "4"]
    assert log.drops == Counter(blocklist=2)
    default = make_step("blocklist")
    assert [d["id"] for d in default.process(iter([{"id": "x", "text": "Cheap VIAGRA online!"},
                                                   {"id": "y", "text": "这里有色情内容"},
                                                   {"id": "z", "text": EN}]), StepLog("b"))] == ["z"]
    twice = make_step("blocklist", {"words": ["spam"], "min_hits": 2})
    assert [d["id"] for d in twice.process(iter([{"id": "1", "text": "spam once"}, {"id": "2", "text": "spam, spam"}]),
                                           StepLog("b"))] == ["1"]


def test_bad_options_are_one_line_errors():
    from llmlab.errors import LlmlabError

    with pytest.raises(LlmlabError, match="min_words"):
        make_step("gopher_quality", {"min_words": 10, "max_words": 5})
    with pytest.raises(LlmlabError, match="not found"):
        make_step("blocklist", {"files": ["no/such/list.txt"]})
    with pytest.raises(LlmlabError, match="did you mean 'min_hits'"):
        make_step("blocklist", {"min_hit": 2})

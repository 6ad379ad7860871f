import csv
import json

import pytest

from llmlab.data.pipeline import make_step
from llmlab.data.steps.base import StepLog
from llmlab.data.steps.decontaminate import ContaminationIndex, EvalFiles, build_index, read_items
from llmlab.errors import LlmlabError
from tests.conftest import SHARED_DATA

GSM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
       "How many clips did Natalia sell altogether in April and May?")
MMLU = "Which of these branches of the trigeminal nerve contain somatic motor processes in the adult human?"
SHORT = "What is the capital city of the French Republic?"  # 9 tokens: matched as a whole
ZH = "下列鸭品种中，哪一个品种的年产蛋量最高而且最适合在南方地区饲养"


@pytest.fixture()
def evals(tmp_path):
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": GSM, "answer": "72"}) + "\n")
    with open(tmp_path / "mmlu.csv", "w", newline="") as f:            # MMLU: no header
        csv.writer(f).writerows([[MMLU, "a", "b", "c", "d", "D"], [SHORT, "Paris", "Rome", "x", "y", "A"],
                                 ["Too short a question?", "a", "b", "c", "d", "A"]])
    (tmp_path / "arc.json").write_text(json.dumps([{"instruction": "Please choose: " + MMLU.replace("adult", "x"),
                                                    "output": "answer1"}]))
    with open(tmp_path / "cmmlu.csv", "w", newline="") as f:           # CMMLU: a header with `Question`
        csv.writer(f).writerows([["", "Question", "A", "B", "C", "D", "Answer"], ["0", ZH, "a", "b", "c", "d", "C"]])
    return tmp_path


def test_read_items_in_the_shared_layouts(evals):
    assert read_items(EvalFiles("g", str(evals / "gsm.jsonl"))) == [GSM]
    assert read_items(EvalFiles("m", str(evals / "mmlu.csv")))[0] == MMLU          # column 0 of a header-less CSV
    assert read_items(EvalFiles("m", str(evals / "mmlu.csv"), ("0", "1")))[1] == SHORT + " Paris"
    assert read_items(EvalFiles("a", str(evals / "arc.json")))[0].startswith("Please choose")
    assert read_items(EvalFiles("c", str(evals / "cmmlu.csv"))) == [ZH]
    with pytest.raises(LlmlabError, match="no field 'questoin'.*did you mean 'question'"):
        read_items(EvalFiles("g", str(evals / "gsm.jsonl"), ("questoin",)))
    with pytest.raises(LlmlabError, match="no file matches"):
        read_items(EvalFiles("g", str(evals / "nothing*.jsonl")))


def test_planted_contamination_is_found_and_named(evals):
    index = ContaminationIndex(ngram=13, min_ngram=8)
    index.add("gsm8k", read_items(EvalFiles("gsm8k", str(evals / "gsm.jsonl"))))
    index.add("mmlu", read_items(EvalFiles("mmlu", str(evals / "mmlu.csv"))))
    index.add("cmmlu", read_items(EvalFiles("cmmlu", str(evals / "cmmlu.csv"))))
    words = GSM.split()
    assert index.match("Blog post. " + " ".join(words[3:16]).upper() + "!!") == {
        "gsm8k": (0, " ".join(w.strip(",.?").lower() for w in words[3:16]))}     # 13 tokens, any case
    assert index.match("Blog post. " + " ".join(words[3:15])) == {}               # 12 tokens: clean
    assert set(index.match(f"Quiz: {MMLU} and {SHORT}")) == {"mmlu"}
    assert index.match(f"Q: {SHORT.lower()}")["mmlu"][0] == 1                       # a short item, whole
    assert index.match("Too short a question? Yes.") == {}                         # under min_ngram: not used
    assert index.match("网友问：" + ZH[2:16] + "？")["cmmlu"][0] == 0                  # 13+ CJK characters


def test_step_drops_or_flags_with_the_benchmark(evals):
    benchmarks = [{"name": "gsm8k", "path": str(evals / "gsm.jsonl")},
                  {"name": "mmlu", "path": str(evals / "*.csv"), "fields": ["0"]}]
    docs = [{"id": "a", "text": "Homework help: " + GSM}, {"id": "b", "text": "A clean document about cooking."},
            {"id": "c", "text": MMLU}]
    log = StepLog("decontaminate")
    out = list(make_step("decontaminate", {"benchmarks": benchmarks}).process(iter(docs), log))
    assert [d["id"] for d in out] == ["b"]
    assert log.drops == {"contaminated_gsm8k": 1, "contaminated_mmlu": 1}
    assert log.samples["contaminated_gsm8k"][0]["contamination"]["gsm8k"]["item"] == 0
    log = StepLog("decontaminate")
    flagged = list(make_step("decontaminate", {"benchmarks": benchmarks, "action": "flag"}).process(iter(docs), log))
    assert [sorted(d.get("contamination", {})) for d in flagged] == [["gsm8k"], [], ["mmlu"]]
    assert log.changes == {"contaminated_gsm8k": 1, "contaminated_mmlu": 1}


def test_bad_config(evals):
    with pytest.raises(LlmlabError, match="benchmarks is empty"):
        make_step("decontaminate", {})
    with pytest.raises(LlmlabError, match="did you mean 'fields'"):
        make_step("decontaminate", {"benchmarks": [{"name": "x", "path": "y", "field": ["q"]}]})
    with pytest.raises(LlmlabError, match="needs both a name and a path"):
        make_step("decontaminate", {"benchmarks": [{"name": "x"}]})
    with pytest.raises(LlmlabError, match="only letters"):
        make_step("decontaminate", {"benchmarks": [{"name": "mmlu/val", "path": "y"}]})


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "train.jsonl").is_file(), reason="needs ../shared/data")
def test_real_benchmark_files():
    index = build_index([EvalFiles("gsm8k", str(SHARED_DATA / "gsm8k" / "train.jsonl")),
                         EvalFiles("arc", str(SHARED_DATA / "arc" / "*" / "train.json")),
                         EvalFiles("mmlu", str(SHARED_DATA / "mmlu" / "val" / "*.csv"), ("0", "1", "2", "3", "4"))])
    assert index.items == {"gsm8k": 7473, "arc": 3370, "mmlu": 1531}
    assert set(index.match("Re: " + GSM)) == {"gsm8k"}
    assert index.match("Lichens are symbiotic organisms made of green algae and fungi. What do the green algae "
                       "supply to the fungi in this symbiotic relationship?").keys() == {"arc"}

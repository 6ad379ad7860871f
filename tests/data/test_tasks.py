"""The synthetic tasks: deterministic, disjoint splits, and answers recomputed here from the questions."""

import json
import re

import pytest

from llmlab.cli import main
from llmlab.data.tasks import GROUPS, KINDS, alpaca_message, expand_kinds, make_tasks, split_of, words
from llmlab.errors import LlmlabError

# each unit in the smallest unit of its quantity, written out independently of tasks.UNITS
IN_SMALLEST = {"km": 10**6, "m": 1000, "cm": 10, "mm": 1, "kg": 1000, "g": 1, "L": 1000, "mL": 1,
               "kilometers": 10**6, "meters": 1000, "centimeters": 10, "millimeters": 1, "kilograms": 1000,
               "grams": 1, "liters": 1000, "milliliters": 1}


def units_of(question: str) -> tuple[int, str, str]:
    """(value, from unit, to unit) of a conversion question."""
    if "many" in question:
        dst, value, src = re.search(r"many (\w+) are in (\d+) (\w+)", question).groups()
    else:
        value, src, dst = re.search(r"(\d+) (\w+) (?:to|= \?) (\w+)", question).groups()
    return int(value), src, dst


def word_of(row) -> str:
    quoted = re.findall(r"'([A-Za-z]+)'", row["instruction"])
    return quoted[0] if quoted else row["input"]


def expected(row) -> str:
    """The answer, worked out from the question text alone."""
    kind, q = row["kind"], row["instruction"]
    if kind in ("add", "mul"):
        a, b = map(int, re.findall(r"\d+", q))
        return str(a + b if kind == "add" else a * b)
    if kind == "units":
        value, src, dst = units_of(q)
        amount = value * IN_SMALLEST[src]
        assert amount % IN_SMALLEST[dst] == 0, "a conversion with a fractional answer"
        return str(amount // IN_SMALLEST[dst])
    word = word_of(row)
    return {"upper": word.upper(), "lower": word.lower(), "reverse": word[::-1], "first": word[0],
            "last": word[-1], "sort": "".join(sorted(word))}[kind]


def test_every_answer_is_right():
    rows = make_tasks(["all"], 60, seed=5) + make_tasks(["all"], 60, seed=5, split="heldout")
    assert len(rows) == 2 * 60 * len(KINDS)
    for row in rows:
        assert row["output"] == expected(row), row
        assert set(row) == {"instruction", "input", "output", "kind"}


def test_same_seed_same_rows_other_seed_other_rows():
    assert make_tasks(["add", "upper"], 30, seed=1) == make_tasks(["add", "upper"], 30, seed=1)
    assert make_tasks(["add", "upper"], 30, seed=1) != make_tasks(["add", "upper"], 30, seed=2)


def _item(row) -> tuple:
    """What a row asks, whatever its phrasing: paraphrases and b + a share it."""
    kind, q = row["kind"], row["instruction"]
    if kind == "add":
        return kind, tuple(sorted(map(int, re.findall(r"\d+", q))))
    if kind == "units":  # 7 km -> m and 7000 m -> km are one fact
        value, src, dst = units_of(q)
        big, small = sorted([src, dst], key=IN_SMALLEST.get, reverse=True)
        return kind, value * IN_SMALLEST[src] // IN_SMALLEST[big], IN_SMALLEST[big] // IN_SMALLEST[small], \
            src in ("kg", "g", "kilograms", "grams"), src in ("L", "mL", "liters", "milliliters")
    if kind == "mul":
        return kind, tuple(map(int, re.findall(r"\d+", q)))
    return kind, word_of(row).lower()


def test_train_and_heldout_never_share_an_item_whatever_the_seeds():
    train = make_tasks(["all"], 250, seed=0)
    heldout = make_tasks(["all"], 100, seed=1, split="heldout")
    assert not {_item(r) for r in train} & {_item(r) for r in heldout}
    assert not {alpaca_message(r) for r in train} & {alpaca_message(r) for r in heldout}
    assert len({_item(r) for r in heldout}) == len(heldout)  # no item twice in one split


def test_kinds_are_balanced_and_the_split_holds_its_fraction():
    rows = make_tasks(["arithmetic", "units"], 40, seed=0)
    assert {k: sum(r["kind"] == k for r in rows) for k in ("add", "mul", "units")} == \
        {"add": 40, "mul": 40, "units": 40}
    share = sum(split_of(f"key{i}") == "heldout" for i in range(20000)) / 20000
    assert share == pytest.approx(0.2, abs=0.01)
    assert split_of("add:47+385", 0.0) == "train" and split_of("add:47+385", 1.0) == "heldout"


def test_string_kinds_never_ask_what_the_question_already_shows():
    rows = make_tasks(["reverse", "sort"], 200, seed=0)
    assert all(r["output"] != word_of(r) for r in rows)  # no palindromes, no already-sorted words
    assert len(words()) == 914 and all(w.isalpha() and w.islower() and 4 <= len(w) <= 5 for w in words())


def test_kind_names_groups_and_errors():
    assert expand_kinds(["strings", "upper", "add"]) == [*GROUPS["strings"], "add"]
    with pytest.raises(LlmlabError, match="unknown task kind 'revers'.*reverse"):
        expand_kinds(["revers"])
    with pytest.raises(LlmlabError, match="only about .* distinct heldout items"):
        make_tasks(["mul"], 500, split="heldout")  # 90 × 8 products, a fifth of them held out


def test_alpaca_message_joins_instruction_and_input():
    assert alpaca_message({"instruction": "Reverse it.", "input": "plant"}) == "Reverse it.\n\nplant"
    assert alpaca_message({"instruction": "What is 2 + 3?", "input": ""}) == "What is 2 + 3?"
    assert alpaca_message({"instruction": "What is 2 + 3?"}) == "What is 2 + 3?"
    assert alpaca_message({"instruction": "What is 2 + 3?", "input": " \n"}) == "What is 2 + 3?"


def test_alpaca_message_is_the_user_turn_sft_trains_on():
    data = pytest.importorskip("llmlab.data.sft")
    for row in make_tasks(["all"], 3, seed=0) + [{"instruction": "Hi.", "input": " "}]:
        row = {"output": "x", **row}
        assert data.to_messages(row, "alpaca", "row")[0] == {"role": "user", "content": alpaca_message(row)}


def test_cli_writes_train_and_heldout(tmp_path, capsys):
    out = tmp_path / "tasks"
    assert main(["data", "tasks", "--kinds", "add,upper", "--train-per-kind", "12", "--heldout-per-kind", "5",
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert (len(train), len(heldout)) == (24, 10) == (summary["train"], summary["heldout"])
    assert train == make_tasks(["add", "upper"], 12, seed=0)
    with pytest.raises(LlmlabError, match="--train-per-kind must be at least 1"):
        main(["data", "tasks", "--train-per-kind", "0", "--debug"])

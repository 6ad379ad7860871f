"""Arena: Elo updates by hand, bootstrap intervals, both judges, and the verb."""

import json

import pytest

from llmlab.cli import main
from llmlab.errors import LlmlabError
from llmlab.evaluate.arena import HumanJudge, ModelJudge, battle, bootstrap_elo, elo, record


def test_one_battle_moves_ratings_by_k_times_surprise():
    # equal ratings: expected score 0.5, so a win moves each side by K/2
    assert elo([("a", "b", 1.0)], ["a", "b"], k=32) == {"a": 1016.0, "b": 984.0}
    # a tie between equals moves nothing; then b (984) beating a (1016): expected 1/(1+10^(32/400))
    after = elo([("a", "b", 1.0), ("a", "b", 0.0)], ["a", "b"], k=32)
    expected_a = 1 / (1 + 10 ** ((984 - 1016) / 400))
    assert after["a"] == pytest.approx(1016 - 32 * expected_a)
    assert sum(after.values()) == pytest.approx(2000)  # Elo is zero-sum


def test_bootstrap_ranks_a_clear_order_with_separated_intervals():
    battles = [("a", "b", 1.0)] * 30 + [("b", "c", 1.0)] * 30 + [("a", "c", 1.0)] * 30 + [("a", "b", 0.0)] * 5
    ratings = bootstrap_elo(battles, ["a", "b", "c"], rounds=200, k=8)
    assert ratings["a"]["elo"] > ratings["b"]["elo"] > ratings["c"]["elo"]
    for r in ratings.values():
        assert r["ci_low"] <= r["elo"] <= r["ci_high"]
    assert ratings["b"]["ci_high"] < ratings["a"]["ci_low"]


def test_bootstrap_of_coin_flips_straddles_the_start():
    battles = [("a", "b", 1.0), ("a", "b", 0.0)] * 50
    ratings = bootstrap_elo(battles, ["a", "b"], rounds=300)
    assert ratings["a"]["ci_low"] < 1000 < ratings["a"]["ci_high"]


def test_record_counts_wins_losses_and_ties():
    tally = record([("a", "b", 1.0), ("b", "a", 1.0), ("a", "b", 0.5)], ["a", "b"])
    assert tally == {"a": {"wins": 1, "losses": 1, "ties": 1}, "b": {"wins": 1, "losses": 1, "ties": 1}}


def test_no_battles_is_an_error():
    with pytest.raises(LlmlabError, match="no battles"):
        bootstrap_elo([], ["a", "b"])


class _FixedJudge(ModelJudge):
    """A judge that always prefers the answer shown as A, or the longer answer."""

    def __init__(self, rule):
        self.rule = rule

    def prefer_a(self, question, a, b):
        return 0.9 if self.rule == "position" or len(a) > len(b) else 0.1


def test_position_bias_becomes_a_tie_and_agreement_a_win():
    assert _FixedJudge("position")("q", "x", "yy")[0] == 0.5
    assert _FixedJudge("length")("q", "long answer", "short")[0] == 1.0
    assert _FixedJudge("length")("q", "short", "long answer")[0] == 0.0


def test_model_judge_gives_a_probability(tiny_llama):
    model, tokenizer = tiny_llama
    judge = ModelJudge(model, tokenizer)
    p = judge.prefer_a("What is 2+2?", "4", "five")
    assert 0.0 < p < 1.0
    score, detail = judge("What is 2+2?", "4", "five")
    assert score in (0.0, 0.5, 1.0) and set(detail) == {"p_a_first", "p_a_second"}


def test_human_judge_maps_the_shown_order_back_to_the_models():
    shown = []
    answers = iter(["x", "1", "2", "t"])  # a bad reply first: asked again
    judge = HumanJudge(seed=1, ask=lambda _: next(answers), show=shown.append)
    first = judge("q", "answer of a", "answer of b")
    a_shown_first = shown[0].index("answer of a") < shown[0].index("answer of b")
    assert first[0] == (1.0 if a_shown_first else 0.0)
    assert "please type 1, 2 or t" in shown
    second = judge("q", "answer of a", "answer of b")
    assert second[0] in (0.0, 1.0)
    assert judge("q", "a", "b")[0] == 0.5


def test_battle_pairs_every_model_on_every_prompt():
    answers = {"m1": ["a", "aaa"], "m2": ["bb", "b"], "m3": ["ccc", "cc"]}
    out = battle(answers, ["q1", "q2"], _FixedJudge("length"), progress=False)
    assert len(out) == 2 * 3
    assert {(b["a"], b["b"]) for b in out} == {("m1", "m2"), ("m1", "m3"), ("m2", "m3")}


def test_arena_verb_writes_battles_and_ratings(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hi.\nName a colour.\n")
    code = main(["arena", "--models", "tiny-llama,tiny-gpt2", "--prompts", str(prompts), "--judge", "tiny-llama",
                 "--max-new-tokens", "4", "--rounds", "50", "--out", str(tmp_path / "run"), "--json"])
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert set(summary["ratings"]) == {"tiny-llama", "tiny-gpt2"} and summary["battles"] == 2
    lines = (tmp_path / "run" / "battles.jsonl").read_text().splitlines()
    assert len(lines) == 2 and (tmp_path / "run" / "answers.jsonl").is_file()


@pytest.mark.parametrize("argv, message", [
    (["arena", "--models", "tiny-llama", "--prompts", "p.txt"], "at least two models"),
    (["arena", "--models", "tiny-llama,tiny-llama", "--prompts", "p.txt"], "the same model twice"),
    (["arena", "--models", "tiny-llama,tiny-gpt2", "--prompts", "nope.txt"], "prompts file not found"),
])
def test_arena_bad_input(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err

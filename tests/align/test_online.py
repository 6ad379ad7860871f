"""`llmlab align` with KTO's unpaired rows and with the online methods (GRPO, PPO, RAFT, best-of-n) end to end on
the tiny model, and their bad input."""

import copy
import json

import pytest

from llmlab.align.online import ModelReward, exact_reward
from llmlab.cli import main
from llmlab.data.preference import collate_unpaired, load_prompts, load_unpaired
from llmlab.data.tasks import make_tasks
from llmlab.errors import LlmlabError

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "bread", "chair", "plant", "tiger"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _thumbs(path):
    rows = [{"prompt": f"Say {w}.", "completion": w if good else w[::-1] + "?", "label": good}
            for w in WORDS for good in (True, False)]
    return _write(path, rows)


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_unpaired_rows_and_pairs_both_read_for_kto(tiny_llama, tmp_path):
    _, tok = tiny_llama
    items, stats = load_unpaired(_thumbs(tmp_path / "t.jsonl"), tok)
    assert stats["completions"] == 24 and stats["desirable"] == 12 and stats["format"] == "unpaired"
    # the KL side is the same prompt with the next row's completion
    assert items[0]["kl_ids"][:10] == items[0]["ids"][:10] and items[0]["kl_ids"] != items[0]["ids"]
    pairs = _write(tmp_path / "p.jsonl", [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1]} for w in WORDS])
    items, stats = load_unpaired(pairs, tok)
    assert stats["completions"] == 24 and [x["desirable"] for x in items[:4]] == [True, False, True, False]
    batch = collate_unpaired(items[:3], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["desirable"].tolist() == [True, False, True]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b", "label": True}] * 3, "every completion is desirable"),
    ([{"prompt": "a", "completion": "b", "label": "maybe"}], "row 1: field 'label' must be true"),
    ([{"prompt": "a", "label": True}], "row 1: missing field 'completion'"),
])
def test_bad_unpaired_rows_are_named(tiny_llama, tmp_path, rows, message):
    with pytest.raises(LlmlabError, match=message):
        load_unpaired(_write(tmp_path / "bad.jsonl", rows), tiny_llama[1])


@pytest.mark.parametrize("tuning, lr", [("lora", "1e-2"), ("full", "1e-3")])
def test_kto_trains_on_thumbs_up_and_down(tmp_path, capsys, tuning, lr):
    data = _thumbs(tmp_path / "thumbs.jsonl")
    assert main(["align", "--model", "tiny-llama", "--data", data, "--method", "kto", "--eval-fraction", "0.25",
                 "--tuning", tuning, "--train.max-steps", "15", "--train.lr", lr, "--train.warmup-steps", "0",
                 "--out", "kto", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    losses = [m["loss"] for m in _lines(tmp_path / "kto") if "loss" in m]
    assert losses[0] == pytest.approx(0.5, abs=1e-4)  # at the reference r = z = 0: 1 − σ(0) for every row
    assert losses[-1] < losses[0]
    assert summary["train_completions"] == 18 and summary["eval_completions"] == 6
    assert summary["reward_margin"] > 0  # desirable completions gained reward over undesirable ones
    if tuning == "full":  # the reference log-probs of both sides, computed once before training
        assert len(json.loads((tmp_path / "kto" / "ref_logps.json").read_text())) == 24


def test_prompts_read_from_every_kind_of_row(tmp_path):
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"prompt": "Hi", "answer": "Hello"},
            {"prompt": [{"role": "user", "content": "Yo"}]}, {"prompt": "Say x.", "chosen": "x", "rejected": "y"},
            {"chosen": "\n\nHuman: Hey\n\nAssistant: Hi", "rejected": "\n\nHuman: Hey\n\nAssistant: Go away"},
            {"prompt": "Same?", "chosen": "yes", "rejected": "yes"}]  # a pair's replies do not matter here
    items = load_prompts(_write(tmp_path / "p.jsonl", rows))
    assert [i["messages"][-1]["content"] for i in items] == ["Add\n\n2 and 3", "Hi", "Yo", "Say x.", "Hey", "Same?"]
    assert [i["answer"] for i in items] == ["5", "Hello", None, None, None, None]
    with pytest.raises(LlmlabError, match="row 1: no prompt"):
        load_prompts(_write(tmp_path / "bad.jsonl", [{"text": "x"}]))


def test_exact_reward_is_the_exact_match():
    items = [{"answer": "432"}, {"answer": "PLANT"}, {"answer": "7"}]
    assert exact_reward(items, ["432.", "plant", "7000"]).tolist() == [1.0, 0.0, 0.0]


def test_grpo_with_a_verifiable_reward_logs_rollouts_and_the_heldout_curve(tmp_path, capsys):
    data = _write(tmp_path / "tasks.jsonl", make_tasks(["upper"], 20))
    assert main(["align", "--model", "tiny-llama", "--data", data, "--method", "grpo", "--reward", "exact",
                 "--options.group", "4", "--sampling.max-new-tokens", "6", "--train.max-steps", "3",
                 "--train.batch-size", "2", "--train.eval-every", "2", "--out", "grpo", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = _lines(tmp_path / "grpo")
    assert [m["rollout"] for m in lines if "rollout" in m] == [1, 2, 3]
    assert [c["step"] for c in summary["curve"]] == [0, 2, 3] and summary["eval_prompts"] == 2
    assert summary["tokens"] > 0 and (tmp_path / "grpo" / "adapter").is_dir()


def test_ppo_best_of_n_and_raft_run_on_a_reward_model(tmp_path, capsys):
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "?"}
                                              for w in WORDS])
    assert main(["align", "--model", "tiny-llama", "--data", pairs, "--method", "reward", "--train.max-steps", "5",
                 "--train.lr", "5e-3", "--out", "rm"]) == 0
    common = ["--model", "tiny-llama", "--data", pairs, "--reward", "rm", "--sampling.max-new-tokens", "6", "--json"]
    assert main(["align", *common, "--method", "ppo", "--options.epochs", "2", "--options.minibatches", "2",
                 "--train.max-steps", "4", "--out", "ppo"]) == 0
    ppo = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rollouts = [m for m in _lines(tmp_path / "ppo") if "rollout" in m]
    assert len(rollouts) == 1 and ppo["steps"] == 4  # one rollout feeds 2 epochs x 2 minibatches
    assert {"reward", "kl", "beta", "value"} <= set(rollouts[0])
    assert main(["align", *common, "--method", "best-of-n", "--options.n", "4", "--out", "bon"]) == 0
    bon = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (tmp_path / "bon" / "best_of_n.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["reward"] == pytest.approx(max(r["rewards"]), abs=1e-4) for r in rows)
    assert bon["reward_best_of_n"] >= bon["reward_one_sample"]
    assert main(["align", *common, "--method", "raft", "--options.rounds", "2", "--options.prompts-per-round", "4",
                 "--train.max-steps", "2", "--out", "raft"]) == 0
    raft = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert raft["steps"] == 4 and raft["kept"] == 8 and [c["round"] for c in raft["curve"]] == [0, 1, 2]


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path, tiny_llama):
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4)
    assert main(["align", "--model", "tiny-llama", "--data", pairs, "--method", "reward", "--train.max-steps", "1",
                 "--eval-fraction", "0", "--out", "rm"]) == 0
    other = copy.deepcopy(tiny_llama[1])
    other.add_tokens(["<extra>"])
    with pytest.raises(LlmlabError, match="has another tokenizer than the policy"):
        ModelReward(str(tmp_path / "rm"), other, "cpu")


@pytest.mark.parametrize("argv, message", [
    (["--method", "grpo"], "this method needs a reward: --reward exact"),
    (["--method", "grpo", "--reward", "exact"], "--reward exact needs an answer in every row"),
    (["--method", "grpo", "--reward", "exact", "--options.group", "1"], "--options.group must be at least 2"),
    (["--method", "best-of-n", "--reward", "exact", "--sampling.temperature", "0"], "best-of-n needs sampled"),
    (["--method", "kto"], "every completion is desirable"),
])
def test_online_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    rows = [{"prompt": "a", "completion": "b", "label": True}] * 4 if argv[1] == "kto" else (
        [{"prompt": "Say a."}] * 4 if "group" not in argv else make_tasks(["upper"], 4))
    if argv[1] == "best-of-n":
        rows = make_tasks(["upper"], 4)
    data = _write(tmp_path / "rows.jsonl", rows)
    assert main(["align", "--model", "tiny-llama", "--data", data, *argv, "--train.max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err

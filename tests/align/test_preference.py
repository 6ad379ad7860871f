"""Preference data in every format, the DPO family's losses against their papers' formulas (values and
gradients), and `llmlab align` end to end on tiny-llama."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.cli import main
from llmlab.data.preference import detect_format, load_pairs, to_pair
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.train.losses import preference_loss
from tests.conftest import SHARED_DATA

ROWS = {
    "hh-rlhf": {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
                "rejected": "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: No."},
    "sharegpt": {"conversations": [{"from": "human", "value": "Name a fruit."}],
                 "chosen": {"from": "gpt", "value": "An apple."}, "rejected": {"from": "gpt", "value": "No."}},
    "messages": {"prompt": "Name a fruit.",
                 "chosen": [{"role": "user", "content": "Name a fruit."},
                            {"role": "assistant", "content": "An apple."}],
                 "rejected": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "No."}]},
    "plain": {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "No."},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_format_gives_the_prompt_and_two_replies(fmt):
    row = ROWS[fmt]
    assert detect_format(row, "row 1") == fmt
    pair = to_pair(row, fmt, "row 1")
    assert (pair.prompt[-1], pair.chosen, pair.rejected) == ({"role": "user", "content": "Name a fruit."},
                                                             "An apple.", "No.")
    if fmt == "hh-rlhf":
        assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]


def test_labels_fall_on_the_last_reply_only(tmp_path):
    _, tok = load_model("tiny-llama")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS["hh-rlhf"]) + "\n")
    (pair,), stats = load_pairs(str(path), tok)
    target = [t for t, label in zip(pair["chosen_ids"], pair["chosen_labels"]) if label != -100]
    assert tok.decode(target).startswith("An apple.") and "Hello" not in tok.decode(target)
    assert stats == {"rows": 1, "pairs": 1, "too_long": 0, "identical": 0, "format": "hh-rlhf"}
    short = {"chosen": "\n\nHuman: Hi\n\nAssistant: Yes", "rejected": "\n\nHuman: Hi\n\nAssistant: No"}
    same = {"chosen": short["chosen"], "rejected": short["chosen"]}
    path.write_text("".join(json.dumps(r) + "\n" for r in (short, ROWS["hh-rlhf"], same)))
    _, stats = load_pairs(str(path), tok, max_len=40)
    assert (stats["pairs"], stats["too_long"], stats["identical"]) == (1, 1, 1)  # left out and counted


def test_an_hh_reply_that_holds_turn_markers_stays_one_reply():
    row = {"chosen": "\n\nHuman: Name artists.\n\nAssistant: Shankar\n\nPiaf",
           "rejected": "\n\nHuman: Name artists.\n\nAssistant: A list?\n\nHumans: ok\n\nAssistant: Queen"}
    pair = to_pair(row, "hh-rlhf", "row 1")
    assert pair.prompt == [{"role": "user", "content": "Name artists."}]
    assert (pair.chosen, pair.rejected) == ("Shankar\n\nPiaf", "A list?\n\nHumans: ok\n\nAssistant: Queen")


def test_every_shared_preference_row_reads():
    rows = json.loads((SHARED_DATA / "preference" / "dpo_en_demo.json").read_text())
    assert all(to_pair(r, detect_format(r, "row"), f"row {i}").chosen for i, r in enumerate(rows, 1))
    for subset in ("helpful-base", "harmless-base"):
        path = SHARED_DATA / "preference" / "hh-rlhf" / subset / "test_first_half.jsonl"
        rows = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
        pairs = [to_pair(r, "hh-rlhf", f"{subset} row {i}") for i, r in enumerate(rows, 1)
                 if r["chosen"] != r["rejected"]]
        assert len(pairs) >= 0.95 * len(rows) and all(p.prompt[-1]["role"] == "user" for p in pairs)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "x", "chosen": "same", "rejected": "same"}, "row 1: chosen and rejected are identical"),
    ({"prompt": "x", "chosen": "a"}, "row 1: missing field 'rejected'"),
    ({"prompt": "x", "chosen": "", "rejected": "b"}, "row 1: field 'chosen' must be a non-empty string"),
])
def test_bad_pairs_are_named(row, message):
    with pytest.raises(LlmlabError, match=message):
        to_pair(row, detect_format(row, "row 1"), "row 1")


def _logps(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 20 + 1).requires_grad_() for _ in range(4)]


def test_losses_are_the_papers_formulas():
    c, r, rc, rr = _logps()
    nc, nr = torch.tensor([3., 5, 7, 2, 4], dtype=torch.float64), torch.tensor([6., 2, 3, 9, 1], dtype=torch.float64)
    beta, eps, gamma = 0.3, 0.1, 0.7
    d = (c - rc) - (r - rr)
    checks = {
        "sigmoid": -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d),
        "hinge": torch.clamp(1 - beta * d, min=0),
        "robust": ((1 - eps) * -F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps),
        "ipo": (((c - rc) / nc - (r - rr) / nr) - 1 / (2 * beta)) ** 2,
        "simpo": -F.logsigmoid(beta * (c / nc - r / nr) - gamma),
    }
    for kind, expected in checks.items():
        got = preference_loss(kind, c, r, rc, rr, nc, nr, beta=beta, label_smoothing=eps, gamma=gamma)
        torch.testing.assert_close(got, expected, msg=kind)
    pw, pl = torch.exp(c / nc), torch.exp(r / nr)  # ORPO: odds = P / (1 − P) of the mean likelihoods
    orpo = -c / nc - beta * F.logsigmoid(torch.log(pw / (1 - pw)) - torch.log(pl / (1 - pl)))
    torch.testing.assert_close(preference_loss("orpo", c, r, n_chosen=nc, n_rejected=nr, beta=beta), orpo)
    # DPO at the reference (Δ = 0) is log 2, whatever β
    assert preference_loss("sigmoid", c, r, c, r, beta=5.0).detach().allclose(torch.full((5,), math.log(2),
                                                                                          dtype=torch.float64))


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "robust", "simpo", "orpo"])
def test_loss_gradients_pass_gradcheck(kind):
    c, r, rc, rr = _logps(1)
    nc, nr = torch.full((5,), 4.0, dtype=torch.float64), torch.full((5,), 6.0, dtype=torch.float64)

    def f(c, r):
        return preference_loss(kind, c, r, rc.detach(), rr.detach(), nc, nr, beta=0.2, label_smoothing=0.1,
                               gamma=0.5).sum()

    assert torch.autograd.gradcheck(f, (c, r))


def _pairs(path, n=24):
    words = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "bread", "chair", "plant", "tiger"]
    rows = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "?"} for w in (words * 2)[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("method, tuning", [("dpo", "lora"), ("ipo", "lora"), ("simpo", "lora"), ("orpo", "lora"),
                                            ("dpo", "full")])
def test_align_trains_and_prefers_the_chosen_replies(tmp_path, capsys, method, tuning):
    data = _pairs(tmp_path / "pairs.jsonl")
    lr = "5e-4" if tuning == "full" else "5e-3"
    assert main(["align", "--model", "tiny-llama", "--data", data, "--method", method, "--tuning", tuning,
                 "--eval-fraction", "0.25", "--train.max-steps", "12", "--train.lr", lr, "--train.log-every", "1",
                 "--train.warmup-steps", "0", "--out", "run", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
              if line and "loss" in json.loads(line)]
    if method == "dpo":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # step 1 starts at the reference: Δ = 0
    assert losses[-1] < losses[0]
    assert summary["pref_accuracy"] >= 0.5 and summary["train_pairs"] == 18 and summary["eval_pairs"] == 6
    assert (tmp_path / "run" / ("model" if tuning == "full" else "adapter")).is_dir()
    if tuning == "full":
        assert len(json.loads((tmp_path / "run" / "ref_logps.json").read_text())) == 24


@pytest.mark.parametrize("argv, message", [
    (["--method", "dpoo"], "unknown --method 'dpoo' (did you mean 'dpo'?)"),
    (["--options.beta", "0"], "--options.beta must be positive, got 0"),
    (["--tuning", "loraa"], "unknown --tuning 'loraa'"),
])
def test_align_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    data = _pairs(tmp_path / "pairs.jsonl")
    assert main(["align", "--model", "tiny-llama", "--data", data, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_reward_model_learns_the_pairs_saves_and_loads_back(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from llmlab.align.reward import load_reward_model, rewards
    from llmlab.data.preference import collate_pairs

    data = _pairs(tmp_path / "pairs.jsonl")
    assert main(["align", "--model", "tiny-llama", "--data", data, "--method", "reward", "--eval-fraction", "0.25",
                 "--train.max-steps", "30", "--train.lr", "5e-3", "--train.warmup-steps", "0", "--out", "rm",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pref_accuracy"] >= 0.5
    model, tok = load_reward_model(tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")  # a standard HF folder
    pairs, _ = load_pairs(data, tok)
    batch = collate_pairs(pairs[:4], tok.pad_token_id)
    with torch.no_grad():
        ours = rewards(model, batch)
        # transformers scores the last non-pad token itself: with right padding and a pad unlike EOS, the same one
        theirs = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)
    assert main(["eval", "reward", "--model", "rm", "--data", data, "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["pairs"] == 24 and scores["pairwise_accuracy"] > 0.5  # trained on 18 of these 24
    assert main(["eval", "reward", "--model", "tiny-llama", "--data", data]) == 2  # not a reward model


def test_sequence_logps_on_the_kept_positions_equal_the_full_logits(tiny_llama, tmp_path, monkeypatch):
    from llmlab.data.preference import collate_pairs
    from llmlab.train import losses

    model, tok = tiny_llama
    pairs, _ = load_pairs(_pairs(tmp_path / "p.jsonl", n=6), tok)
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        kept = losses.sequence_logps(model, batch)
        monkeypatch.setattr(losses, "_takes_logits_to_keep", lambda model: False)
        full = losses.sequence_logps(model, batch)
    torch.testing.assert_close(kept, full)

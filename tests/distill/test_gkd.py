import copy

import pytest
import torch

from llmlab.distill.gkd import GKDConfig, gkd_loss, on_policy_batch
from llmlab.distill.kd import KDConfig, kd_loss
from llmlab.errors import LlmlabError
from llmlab.train.losses import generalized_jsd
from tests.distill.helpers import batch, pair


def test_off_policy_gkd_is_jsd_on_the_data():
    teacher, student, tok = pair()
    b = batch(tok, prompt=5)
    loss, n = gkd_loss(teacher, tok, GKDConfig(beta=0.3, lmbda=0.0))(student, b)
    with torch.no_grad():
        s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    mask = b["labels"][:, 1:] != -100
    assert n == int(mask.sum())
    torch.testing.assert_close(loss.detach(), generalized_jsd(s, t, 0.3)[mask].sum())


def test_beta_zero_off_policy_is_supervised_kd():
    teacher, student, tok = pair()
    b = batch(tok)
    gkd, _ = gkd_loss(teacher, tok, GKDConfig(beta=0.0, lmbda=0.0))(student, b)
    kd, _ = kd_loss(teacher, KDConfig(temperature=1.0, alpha=1.0))(student, b)
    torch.testing.assert_close(gkd, kd)


def test_on_policy_batches_are_the_students_own_greedy_completions():
    teacher, student, tok = pair()
    b = batch(tok, prompt=6)
    cfg = GKDConfig(lmbda=1.0, temperature=0.0, max_new_tokens=4)
    new = on_policy_batch(student, tok, b, cfg, seed=0)
    for row in range(3):
        prompt = b["input_ids"][row, :6]
        with torch.no_grad():
            ref = student.generate(prompt[None], max_new_tokens=4, do_sample=False, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)[0]
        n = int(new["attention_mask"][row].sum())
        assert new["input_ids"][row, :n].tolist() == ref[:n].tolist()
        assert (new["labels"][row, :6] == -100).all() and (new["labels"][row, 6:n] != -100).all()
    student.train()
    loss, n = gkd_loss(teacher, tok, cfg)(student, b)  # λ = 1: the loss is the JSD on that batch
    expected, m = gkd_loss(teacher, tok, GKDConfig(lmbda=0.0))(student, new)
    assert n == m
    torch.testing.assert_close(loss, expected)


def test_lambda_is_the_fraction_of_on_policy_batches(monkeypatch):
    teacher, student, tok = pair()
    calls = []
    import llmlab.distill.gkd as gkd

    monkeypatch.setattr(gkd, "on_policy_batch", lambda model, tok, b, cfg, seed: calls.append(seed) or b)
    loss_fn = gkd_loss(teacher, tok, GKDConfig(lmbda=0.25, seed=3))
    student.train()
    b = batch(tok, n=1, length=8)
    for _ in range(400):
        loss_fn(student, b)
    assert 0.19 < len(calls) / 400 < 0.31
    student.eval()
    loss_fn(student, b)  # evaluation never samples
    assert len(calls) == len(set(calls))  # each on-policy batch draws with its own seed


def test_identical_student_has_zero_loss():
    teacher, _, tok = pair()
    student = copy.deepcopy(teacher)
    loss, _ = gkd_loss(teacher, tok, GKDConfig(lmbda=0.0))(student, batch(tok))
    assert abs(float(loss.detach())) < 1e-5


def test_gkd_config_checks():
    with pytest.raises(LlmlabError, match="beta"):
        GKDConfig(beta=1.5)
    with pytest.raises(LlmlabError, match="lmbda"):
        GKDConfig(lmbda=-0.1)

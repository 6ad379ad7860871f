import pytest
import torch
import torch.nn.functional as F

from llmlab.distill.kd import KDConfig, ce_loss, kd_loss
from llmlab.errors import LlmlabError
from llmlab.train.losses import sft_loss
from tests.distill.helpers import batch, pair


def direct_kd(student_logits, teacher_logits, labels, tau, alpha):
    """Hinton et al.'s loss, position by position, straight from the formula."""
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            p = (teacher_logits[b, t] / tau).softmax(-1)
            q = (student_logits[b, t] / tau).softmax(-1)
            kl = float((p * (p.log() - q.log())).sum())
            ce = float(-student_logits[b, t].log_softmax(-1)[y])
            total, n = total + alpha * tau ** 2 * kl + (1 - alpha) * ce, n + 1
    return total, n


@pytest.mark.parametrize("tau,alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.3)])
def test_kd_loss_matches_the_formula(tau, alpha):
    teacher, student, tok = pair()
    b = batch(tok, prompt=5)
    loss, n = kd_loss(teacher, KDConfig(temperature=tau, alpha=alpha))(student, b)
    with torch.no_grad():
        expected, count = direct_kd(student(**_inputs(b)).logits, teacher(**_inputs(b)).logits, b["labels"], tau, alpha)
    assert n == count
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_alpha_zero_is_cross_entropy_and_matches_sft():
    teacher, student, tok = pair()
    b = batch(tok, prompt=4)
    loss, n = kd_loss(teacher, KDConfig(alpha=0.0))(student, b)
    ce, m = ce_loss(student, b)
    sft, k = sft_loss(student, b)
    assert n == m == k
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(ce, sft)


def test_student_equal_to_teacher_has_zero_kl_and_no_kl_gradient():
    teacher, _, tok = pair()
    import copy

    student = copy.deepcopy(teacher).requires_grad_(True)
    loss, _ = kd_loss(teacher, KDConfig(temperature=3.0, alpha=1.0))(student, batch(tok))
    assert abs(float(loss.detach())) < 1e-5
    loss.backward()
    assert max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None) < 1e-6


def test_temperature_squared_keeps_the_gradient_scale():
    """Hinton §2: for high τ, ∂KL/∂z ≈ (z_s − z_t)/(V τ²), so τ²·KL has a τ-independent gradient."""
    s = torch.randn(1, 2, 50, generator=torch.Generator().manual_seed(0)) * 0.1
    t = torch.randn(1, 2, 50, generator=torch.Generator().manual_seed(1)) * 0.1
    norms = []
    for tau in (10.0, 40.0):
        z = s.clone().requires_grad_()
        from llmlab.train.losses import forward_kl

        (forward_kl(z, t, tau) * tau ** 2).sum().backward()
        norms.append(float(z.grad.norm()))
    assert norms[0] == pytest.approx(norms[1], rel=0.02)


def test_kd_config_checks():
    with pytest.raises(LlmlabError, match="temperature"):
        KDConfig(temperature=0)
    with pytest.raises(LlmlabError, match="alpha"):
        KDConfig(alpha=1.5)


def _inputs(b):
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def test_ce_ignores_padding():
    _, student, tok = pair()
    b = batch(tok)
    loss, n = ce_loss(student, b)
    logits = student(**_inputs(b)).logits
    expected = sum(F.cross_entropy(logits[i, :-1], b["labels"][i, 1:], ignore_index=-100, reduction="sum")
                   for i in range(3))
    torch.testing.assert_close(loss, expected)
    assert n == int((b["labels"][:, 1:] != -100).sum())

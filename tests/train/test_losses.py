import math

import pytest
import torch

from llmlab.train.losses import forward_kl, generalized_jsd, reverse_kl


def logits(seed, shape=(2, 3, 7)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def direct_kl(a, b):
    """KL(a ‖ b) of two probability tensors, straight from the definition."""
    return (a * (a.log() - b.log())).sum(-1)


def test_forward_and_reverse_kl_match_their_definitions():
    s, t = logits(0), logits(1)
    for tau in (1.0, 2.5):
        p, q = (t / tau).softmax(-1), (s / tau).softmax(-1)
        torch.testing.assert_close(forward_kl(s, t, tau), direct_kl(p, q))
        torch.testing.assert_close(reverse_kl(s, t, tau), direct_kl(q, p))


def test_divergences_of_identical_logits_are_zero():
    x = logits(2)
    for value in (forward_kl(x, x), reverse_kl(x, x), generalized_jsd(x, x, 0.3)):
        torch.testing.assert_close(value, torch.zeros(2, 3, dtype=torch.float64))


def test_jsd_matches_definition_and_symmetry():
    s, t = logits(3), logits(4)
    p, q = t.softmax(-1), s.softmax(-1)
    for beta in (0.1, 0.5, 0.9):
        m = beta * p + (1 - beta) * q
        torch.testing.assert_close(generalized_jsd(s, t, beta), beta * direct_kl(p, m) + (1 - beta) * direct_kl(q, m))
        # JSD(β)(p ‖ q) = JSD(1 − β)(q ‖ p): swapping the models mirrors β
        torch.testing.assert_close(generalized_jsd(s, t, beta), generalized_jsd(t, s, 1 - beta))
    # β = 1/2 is the ordinary Jensen-Shannon divergence, at most log 2
    assert float(generalized_jsd(s, t, 0.5).max()) <= math.log(2)


def test_jsd_ends_are_forward_and_reverse_kl():
    s, t = logits(5), logits(6)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), forward_kl(s, t))
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), reverse_kl(s, t))
    # JSD(β) itself vanishes as β → 0: the ends are defined to be the two KLs (as GKD does), not limits
    assert float(generalized_jsd(s, t, 1e-6).abs().max()) < 1e-4


def test_bf16_logits_are_scored_in_float32():
    s, t = logits(7).bfloat16(), logits(8).bfloat16()
    assert forward_kl(s, t).dtype == torch.float32
    torch.testing.assert_close(forward_kl(s, t), forward_kl(s.float(), t.float()))


def test_gradients_by_gradcheck():
    s, t = logits(9, (2, 5)).requires_grad_(), logits(10, (2, 5))
    assert torch.autograd.gradcheck(lambda x: forward_kl(x, t, 1.7), (s,))
    assert torch.autograd.gradcheck(lambda x: reverse_kl(x, t, 1.7), (s,))
    assert torch.autograd.gradcheck(lambda x: generalized_jsd(x, t, 0.3, 1.7), (s,))


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_trl_gkd(beta, temperature):
    """Parity with trl's GKDTrainer.generalized_jsd_loss (the GKD authors' definition in trl)."""
    pytest.importorskip("trl")
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    s, t = logits(11, (2, 4, 9)).float(), logits(12, (2, 4, 9)).float()
    labels = torch.tensor([[1, 2, -100, 3], [-100, 4, 5, 6]])
    ours = generalized_jsd(s, t, beta, temperature)[labels != -100].sum()
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature, reduction="sum")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

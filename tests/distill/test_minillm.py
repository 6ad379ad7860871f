import copy
import math

import pytest
import torch

from llmlab.distill.minillm import MiniLLMConfig, MixedPolicy, future_rewards, minillm_loss
from llmlab.errors import LlmlabError
from llmlab.train.losses import reverse_kl
from tests.distill.helpers import batch, grads, pair


def test_future_rewards_match_a_loop():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [0.5, -1.0, 2.0, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    for normalise in (True, False):
        for inclusive in (True, False):
            out = future_rewards(r, mask, normalise, inclusive)
            for b in range(2):
                for t in range(5):
                    later = [float(r[b, u]) for u in range(5) if mask[b, u] and (u > t or inclusive and u == t)]
                    want = (sum(later) / len(later) if later else 0.0) if normalise else sum(later)
                    assert float(out[b, t]) == pytest.approx(want)


def test_mixed_policy_is_the_mixture_of_teacher_and_student():
    teacher, student, tok = pair()
    ids = batch(tok, n=1)["input_ids"]
    with torch.no_grad():
        out = MixedPolicy(student, teacher, 0.2)(ids, logits_to_keep=1)
        p, q = teacher(ids).logits[:, -1].softmax(-1), student(ids).logits[:, -1].softmax(-1)
    torch.testing.assert_close(out.logits[:, -1].exp(), 0.2 * p + 0.8 * q)
    assert len(out.past_key_values) == 2  # one KV cache per model


def test_one_step_loss_is_the_exact_reverse_kl():
    """A one-token sample has no future reward: the surrogate is the single-step term, KL(q_θ ‖ p) at
    the last prompt position (with pure student sampling, w = 1), and so is its gradient."""
    teacher, student, tok = pair()
    b = batch(tok, n=2, length=12, prompt=99)  # only each row's last token is a target
    student.train()
    loss, n = minillm_loss(teacher, tok, MiniLLMConfig(mix_alpha=0.0, max_new_tokens=1, temperature=0.0))(student, b)
    loss.backward()
    got = grads(student)
    student.zero_grad()
    prompts = [b["input_ids"][i, :int(b["attention_mask"][i].sum()) - 1] for i in range(2)]
    expected = sum(reverse_kl(student(p[None]).logits[0, -1], teacher(p[None]).logits[0, -1]) for p in prompts)
    expected.backward()
    assert n == 2
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for g, e in zip(got, grads(student)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_student_equal_to_teacher_gets_zero_loss_and_gradient():
    teacher, _, tok = pair()
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    loss, _ = minillm_loss(teacher, tok, MiniLLMConfig(max_new_tokens=6, prompt_len=8))(student, batch(tok))
    loss.backward()
    assert abs(float(loss.detach())) < 1e-5  # r_t = 0 and KL_t = 0 everywhere
    assert max(float(g.abs().max()) for g in grads(student)) < 1e-5


def test_policy_gradient_is_unbiased_for_the_reverse_kl():
    """On a two-token toy (no model), the score-function surrogate's gradient, averaged over many
    samples, equals the exact gradient of the sequence-level reverse KL."""
    torch.manual_seed(0)
    V = 3
    p1 = torch.tensor([0.6, 0.3, 0.1])
    p2 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])  # p(y2 | y1)
    z1 = torch.zeros(V, requires_grad=True)
    z2 = torch.zeros(V, V, requires_grad=True)
    q1, q2 = z1.softmax(-1), z2.softmax(-1)
    exact = sum(q1[a] * q2[a, b] * (torch.log(q1[a] * q2[a, b]) - math.log(p1[a] * p2[a, b]))
                for a in range(V) for b in range(V))
    want = torch.autograd.grad(exact, (z1, z2))
    n = 20000
    q1, q2 = z1.softmax(-1), z2.softmax(-1)
    a = torch.multinomial(q1.detach(), n, replacement=True)
    b = torch.multinomial(q2.detach()[a], 1).squeeze(1)
    lq1, lq2 = z1.log_softmax(-1), z2.log_softmax(-1)
    r = torch.stack([p1.log()[a] - lq1[a], p2.log()[a, b] - lq2[a, b]], dim=1).detach()  # (n, 2)
    future = future_rewards(r, torch.ones(n, 2, dtype=torch.bool))  # R_2 for position 1, 0 for position 2
    single = torch.stack([(q1 * (q1.log() - p1.log())).sum().expand(n), (q2 * (q2.log() - p2.log())).sum(-1)[a]], 1)
    surrogate = (single - future * torch.stack([lq1[a], lq2[a, b]], 1)).sum(1).mean()
    got = torch.autograd.grad(surrogate, (z1, z2))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0.03, rtol=0)


def test_minillm_config_checks():
    with pytest.raises(LlmlabError, match="mix_alpha"):
        MiniLLMConfig(mix_alpha=1.0)
    with pytest.raises(LlmlabError, match="max_weight"):
        MiniLLMConfig(max_weight=0)

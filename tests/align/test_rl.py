"""The on-policy pieces (train/rl.py) against hand computations, and PPO and GRPO on a toy task where the
reward must rise."""

import statistics

import pytest
import torch

from llmlab.align.grpo import GRPOConfig, train_grpo
from llmlab.align.online import Online, encode_prompts, reference_policy
from llmlab.align.ppo import HEAD, PPOConfig, train_ppo
from llmlab.generation.generate import SamplingConfig
from llmlab.models import load_model
from llmlab.peft import apply_method
from llmlab.train import TrainConfig
from llmlab.train.rl import (AdaptiveKL, clipped_policy_loss, clipped_value_loss, gae, group_advantages, grpo_loss,
                             kl_k3, reply_logps, rollout, token_rewards, whiten)


def test_gae_is_the_discounted_sum_of_td_errors():
    rewards = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 0.3, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, -0.3, 9.0], [0.1, -0.2, 9.0, 9.0]])  # 9s lie past the replies' ends
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row in range(2):
        n = int(mask[row].sum())
        v = values[row, :n].tolist() + [0.0]  # V = 0 after the last token
        deltas = [rewards[row, t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):  # A_t = Σ_l (γλ)^l δ_{t+l}, by hand
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert advantages[row, t].item() == pytest.approx(float(expected), abs=1e-6)
            assert returns[row, t].item() == pytest.approx(float(expected) + v[t], abs=1e-6)
        assert advantages[row, n:].abs().sum() == 0


def test_the_clipped_objectives_gradient_is_the_formulas():
    torch.manual_seed(0)
    old = torch.randn(2, 5)
    logps = (old + 0.3 * torch.randn(2, 5)).requires_grad_(True)
    adv = torch.randn(2, 5)
    mask = torch.tensor([[1.0, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    clip = 0.2
    clipped_policy_loss(logps, old, adv, mask, clip).backward()
    ratio = (logps - old).exp().detach()
    # d/dlogπ of max(−Aρ, −A clip(ρ)): −Aρ where the unclipped term is the max, else 0 (the clipped one is flat)
    unclipped_wins = (-adv * ratio) >= (-adv * ratio.clamp(1 - clip, 1 + clip))
    expected = torch.where(unclipped_wins, -adv * ratio, torch.zeros_like(ratio)) * mask / mask.sum()
    torch.testing.assert_close(logps.grad, expected)

    values = torch.randn(2, 5, requires_grad=True)
    old_v, returns = torch.randn(2, 5), torch.randn(2, 5)
    clipped_value_loss(values, old_v, returns, mask, 0.2).backward()
    v = values.detach()
    clipped = old_v + (v - old_v).clamp(-0.2, 0.2)
    use_unclipped = (v - returns) ** 2 >= (clipped - returns) ** 2
    inside = (v - old_v).abs() < 0.2
    grad = torch.where(use_unclipped, v - returns, torch.where(inside, clipped - returns, torch.zeros_like(v)))
    torch.testing.assert_close(values.grad, grad * mask / mask.sum())


def test_token_rewards_put_the_score_on_the_last_reply_token():
    logps, ref = torch.tensor([[-1.0, -2.0, -3.0]] * 2), torch.tensor([[-1.5, -2.0, -2.0]] * 2)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    r = token_rewards(torch.tensor([10.0, 20.0]), logps, ref, mask, beta=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.0, 10.1], [-0.05, 20.0, 0.0]]))


def test_whitening_and_group_advantages():
    x, mask = torch.tensor([[1.0, 2, 3], [4, 5, 0]]), torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    w = whiten(x, mask)
    assert float(w[mask.bool()].mean()) == pytest.approx(0, abs=1e-6)
    assert float(w[mask.bool()].pow(2).mean()) == pytest.approx(1, abs=1e-4) and w[1, 2] == 0
    a = group_advantages(torch.tensor([1.0, 0, 0, 1, 3, 3, 3, 3]), k=4)
    expected = (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (torch.tensor([1.0, 0, 0, 1]).std() + 1e-4)
    torch.testing.assert_close(a[:4], expected)
    assert a[4:].abs().sum() == 0  # a group that all scored the same teaches nothing


def test_k3_is_an_unbiased_never_negative_kl_estimate():
    torch.manual_seed(0)
    p, q = torch.softmax(torch.randn(20), 0), torch.softmax(torch.randn(20), 0)
    samples = torch.multinomial(p, 200_000, replacement=True)
    k3 = kl_k3(p.log()[samples], q.log()[samples])
    assert (k3 >= 0).all()
    assert float(k3.mean()) == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=0.02)


def test_grpo_loss_gradient_is_the_policy_gradient_when_on_policy():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv, mask = torch.tensor([1.5, -0.5]), torch.tensor([[1.0, 1], [1, 0]])
    grpo_loss(logps, logps.detach(), logps.detach(), adv, mask, clip=0.2, beta=0.04).sum().backward()
    # ρ = 1 and the k3 term's gradient vanishes at π = π_ref: −Â / |o| on each of the reply's tokens
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.75, -0.75], [0.5, 0.0]]))


def test_the_adaptive_kl_controller_moves_beta_towards_the_target():
    ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # overshoot: error clipped at +0.2
    assert AdaptiveKL(0.1, target=6.0, horizon=100).update(3.0, 10) == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))
    assert AdaptiveKL(0.1, target=6.0, horizon=100).update(6.6, 10) == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))
    assert AdaptiveKL(0.1, target=None).update(50.0, 10) == 0.1


def test_a_rollouts_log_probs_are_those_of_each_row_alone(tiny_llama):
    model, tok = tiny_llama
    prompts = [tok("Say apple.").input_ids, tok("Hi").input_ids, tok("A longer prompt here.").input_ids]
    ro = rollout(model, tok, prompts, SamplingConfig(max_new_tokens=6, temperature=1.0))
    with torch.no_grad():
        logps = reply_logps(model, ro)
        for i, (prompt, reply) in enumerate(zip(prompts, ro.replies)):
            alone = model(input_ids=torch.tensor([prompt + reply])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            expected = alone.gather(1, torch.tensor(reply)[:, None]).squeeze(-1)
            torch.testing.assert_close(logps[i, :len(reply)], expected, rtol=1e-5, atol=1e-5)
            assert ro.reply_mask[i].sum() == len(reply)


def _ascii_share(items, replies):
    """The toy reward: the share of a reply's characters that are ASCII (a random byte model starts near ½)."""
    return torch.tensor([sum(c.isascii() for c in r) / max(len(r), 1) for r in replies])


def _toy(method: str, cfg, lr: float, steps: int, batch: int):
    torch.manual_seed(0)
    model, tok = load_model("tiny-llama")
    items = encode_prompts([{"messages": [{"role": "user", "content": f"Say {w}."}], "answer": None}
                            for w in ["apple", "river", "stone", "cloud", "green", "table", "music", "light"]], tok)
    model = apply_method(model, "full", {}, tokenizer=tok)
    logs = []
    ctx = Online(model, tok, items, [], _ascii_share, reference_policy(model, True),
                 SamplingConfig(max_new_tokens=8, temperature=1.0),
                 TrainConfig(lr=lr, max_steps=steps, batch_size=batch, warmup_steps=0, log_every=100), None, True)
    ctx.log = lambda **metrics: logs.append(metrics)
    summary = (train_ppo if method == "ppo" else train_grpo)(cfg, ctx)
    return [m for m in logs if "reward" in m], summary, model


def test_grpo_raises_the_reward_of_a_toy_task():
    logs, summary, _ = _toy("grpo", GRPOConfig(group=4), lr=3e-2, steps=40, batch=4)
    rewards = [m["reward"] for m in logs]
    assert len(logs) == 40 and summary["steps"] == 40
    assert statistics.mean(rewards[-8:]) > statistics.mean(rewards[:8]) + 0.15
    assert all(m["kl"] >= 0 for m in logs)  # k3 never goes negative


def test_ppo_raises_the_reward_of_a_toy_task_with_bounded_kl():
    logs, summary, model = _toy("ppo", PPOConfig(epochs=1, target_kl=1.0), lr=1e-2, steps=60, batch=8)
    rewards = [m["reward"] for m in logs]
    assert len(logs) == 60  # one epoch and one minibatch: a rollout per step
    assert statistics.mean(rewards[-10:]) > statistics.mean(rewards[:10]) + 0.1
    assert max(m["kl"] for m in logs) < 10  # nats per reply: the penalty holds the policy near the reference
    assert summary["final_beta"] != 0.05  # the controller moved β
    assert not hasattr(model, HEAD)  # the value head does not outlive training

"""QAT: the STE's gradient, the fake-quant forward, data-free generation, distillation, conversion."""

import contextlib
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.compress.qat import (FakeQuantLinear, QATConfig, QATSpec, collate, convert_qat, frozen_copy, generate_data,
                                 prepare_qat, quantize_qat, training_data)
from llmlab.config import build
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.models.packed.qlinear import QuantLinear
from llmlab.models.packed.quant import QuantSpec, dequantize, fake_quantize, fit_grid, quantize
from llmlab.runs import RunOptions
from llmlab.stages.qat import qat_verb
from llmlab.train.loop import evaluate, fit
from llmlab.train.losses import SoftTargetLoss, soft_cross_entropy


def _linear(n_in=64, n_out=32, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def _token_grid(x: torch.Tensor, bits: int, group: int = 0) -> torch.Tensor:
    """Oracle: symmetric min-max fake quantization, one scale per row of x, or per `group` columns of it."""
    rows = x.reshape(-1, group) if group else x.reshape(-1, x.shape[-1])
    scale = (rows.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.clamp(torch.round(rows * (1.0 / scale)), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return (scale * q).reshape(x.shape)


@pytest.mark.parametrize("spec", [QuantSpec(4, 16), QuantSpec(3, 0, symmetric=True), QuantSpec(2, -1)])
def test_forward_is_the_matmul_with_the_dequantized_weight(spec):
    base = _linear()
    x = torch.randn(2, 5, 64)
    w_hat = dequantize(quantize(base.weight, *fit_grid(base.weight, spec), spec), *fit_grid(base.weight, spec), spec)
    assert torch.equal(FakeQuantLinear(base, spec)(x), F.linear(x, w_hat, base.bias))
    assert not torch.equal(w_hat, base.weight)  # it does quantize


def test_ste_gradient_is_the_float_layers_gradient_at_the_quantized_weight():
    base, spec = _linear(), QuantSpec(3, 16)
    x, r = torch.randn(4, 64, requires_grad=True), torch.randn(4, 32)
    (FakeQuantLinear(base, spec)(x) * r).sum().backward()
    # The oracle: a float layer whose weight *is* ŵ, differentiated with respect to ŵ.
    w_hat = fake_quantize(base.weight.detach(), spec).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (F.linear(x2, w_hat, base.bias.detach()) * r).sum().backward()
    assert base.weight.grad is not None and torch.equal(base.weight.grad, w_hat.grad)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(base.bias.grad, r.sum(0))


def test_activation_and_kv_fake_quantization_per_token_and_head():
    base, spec = _linear(bias=False), QuantSpec(4, 16)
    x = torch.randn(3, 7, 64, requires_grad=True)
    layer = FakeQuantLinear(base, spec, act_bits=8, out_bits=4, out_group=16)
    y = layer(x)
    w_hat = fake_quantize(base.weight.detach(), spec)
    expected = _token_grid(F.linear(_token_grid(x.detach(), 8), w_hat), 4, group=16)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    assert len(y[0, 0, :16].unique()) <= 16  # one head of one token: at most 2^4 levels
    # The STE passes the gradient through both roundings: ∂/∂x = (∂L/∂y) ŵ.
    r = torch.randn_like(y)
    (y * r).sum().backward()
    torch.testing.assert_close(x.grad, r @ w_hat, rtol=1e-6, atol=1e-6)


def test_prepare_qat_swaps_the_decoder_linears():
    model, _ = load_model("tiny-llama")
    prepare_qat(model, QATSpec(bits=4, group_size=32, kv_bits=8, skip=[r"layers\.1\.mlp\.down_proj"]))
    fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert len(fakes) == 13 and "model.layers.1.mlp.down_proj" not in fakes
    assert isinstance(model.lm_head, nn.Linear)  # the head and embeddings stay float
    assert {n.rsplit(".", 1)[-1] for n, m in fakes.items() if m.out_spec} == {"k_proj", "v_proj"}
    assert fakes["model.layers.0.self_attn.k_proj"].out_spec.group_size == 16  # one scale per token and head
    assert all(p.requires_grad for p in model.parameters())  # full QAT: the base weights train
    with pytest.raises(LlmlabError, match="already quantized or prepared"):
        prepare_qat(model, QATSpec(bits=4, group_size=32))


def test_the_student_starts_as_the_rtn_model():
    model, _ = load_model("tiny-llama")
    rtn = frozen_copy(model)
    with torch.no_grad():
        for m in rtn.model.layers.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(fake_quantize(m.weight, QuantSpec(4, 32)))
    prepare_qat(model, QATSpec(bits=4, group_size=32))
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, rtn(ids).logits, rtol=0, atol=1e-6)


def test_convert_qat_gives_quant_linears_with_the_fake_quant_outputs(monkeypatch, caplog):
    model, _ = load_model("tiny-llama")
    prepare_qat(model, QATSpec(bits=4, group_size=32, symmetric=True))
    torch.manual_seed(1)
    for p in model.parameters():  # as after training: weights moved off their initial values
        p.data.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        fake = model(ids).logits
        weights = {n: fake_quantize(m.base_layer.weight, m.spec) for n, m in model.named_modules()
                   if isinstance(m, FakeQuantLinear)}
        convert_qat(model)
        quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        assert set(quant) == set(weights)
        assert all(torch.equal(quant[n].dequantized_weight(), w) for n, w in weights.items())
        monkeypatch.setattr(QuantLinear, "use_kernels", False)
        torch.testing.assert_close(model(ids).logits, fake, rtol=0, atol=1e-5)
    other, _ = load_model("tiny-llama")
    with caplog.at_level(logging.WARNING, logger="llmlab"):
        convert_qat(prepare_qat(other, QATSpec(bits=4, group_size=32, act_bits=8)))
    assert "weight-only" in caplog.text


def test_generated_data_follows_the_first_tokens_rule():
    model, tokenizer = load_model("tiny-llama")
    data = generate_data(model, tokenizer, 7, 12, greedy_tokens=[3, 4, 5], batch_size=2, seed=3)
    assert data.shape == (7, 12) and data.dtype == torch.long
    special = set(tokenizer.all_special_ids)
    assert all(0 <= t < len(tokenizer) and t not in special for t in data[:, 0].tolist())
    with torch.no_grad():
        top1 = model(data).logits.argmax(-1)  # (N, T): the greedy choice after each prefix
    for i, row in enumerate(data):
        g = [3, 4, 5][i % 3]  # the sequence's first g tokens: the random start, then top-1 choices
        assert torch.equal(row[1:g], top1[i, :g - 1])
    sampled = (data[:, 1:] != top1[:, :-1]).sum()
    assert sampled > 0  # the rest is sampled, not greedy
    assert torch.equal(data, generate_data(model, tokenizer, 7, 12, batch_size=2, seed=3))  # reproducible
    assert not torch.equal(data, generate_data(model, tokenizer, 7, 12, seed=4))
    greedy = generate_data(model, tokenizer, 4, 12, top_k=1, seed=3)
    with torch.no_grad():
        assert torch.equal(greedy[:, 1:], model(greedy).logits.argmax(-1)[:, :-1])


def kd_loss(student_logits, teacher_logits):
    return soft_cross_entropy(student_logits, teacher_logits).sum()  # LLM-QAT's loss, summed over positions


def test_kd_loss_is_the_soft_cross_entropy():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    expected = sum(-(t[b, i].softmax(-1) * s[b, i].log_softmax(-1)).sum() for b in range(2) for i in range(3))
    torch.testing.assert_close(kd_loss(s, t), expected)
    # Against itself it is the teacher's entropy, the minimum over students.
    entropy = -(t.softmax(-1) * t.log_softmax(-1)).sum()
    torch.testing.assert_close(kd_loss(t, t), entropy)


def test_llm_qat_distillation_reduces_the_kd_loss():
    model, tokenizer = load_model("tiny-llama")
    data = list(generate_data(model, tokenizer, 32, 32, seed=0))
    teacher = frozen_copy(model)
    prepare_qat(model, QATSpec(bits=2, group_size=32))
    loss = SoftTargetLoss(teacher)
    entropy = evaluate(teacher, loss, data, 8, collate, contextlib.nullcontext)
    before = evaluate(model, loss, data, 8, collate, contextlib.nullcontext)
    cfg = build(QATConfig, {"train": {"lr": 3e-4, "max_steps": 40, "batch_size": 8, "warmup_steps": 0}}).train
    fit(model, loss, data, cfg, collate=collate, progress=False)
    after = evaluate(model, loss, data, 8, collate, contextlib.nullcontext)
    # KD loss − teacher entropy is the KL divergence student ‖ teacher: distillation must cut it well down.
    assert before - entropy > 1e-3
    assert after < before and after - entropy < 0.5 * (before - entropy)


def test_quantize_qat_data_free_end_to_end():
    model, tokenizer = load_model("tiny-llama")
    cfg = build(QATConfig, {"bits": 4, "group_size": 32, "n_samples": 8, "eval_samples": 0, "seq_len": 16,
                            "train": {"max_steps": 2, "batch_size": 4}})
    quantize_qat(model, None, cfg, tokenizer=tokenizer)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.vocab_size)
    with pytest.raises(LlmlabError, match="pass the tokenizer"):
        quantize_qat(load_model("tiny-llama")[0], None, cfg)


def test_training_data_from_a_text_file_instead(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("sphinx of black quartz, judge my vow. " * 60)
    model, tokenizer = load_model("tiny-llama")
    cfg = build(QATConfig, {"data": str(text), "n_samples": 6, "eval_samples": 2, "seq_len": 24})
    data = training_data(model, tokenizer, cfg)
    assert data.shape == (8, 24)
    ids = tokenizer(text.read_text(), add_special_tokens=False).input_ids
    row = data[0].tolist()
    assert any(ids[i:i + 24] == row for i in range(len(ids) - 23))  # a window of the file, not generated text


def test_qat_verb_saves_a_loadable_quantized_model(tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cfg = build(QATConfig, {"model": "tiny-llama", "bits": 3, "group_size": 32, "n_samples": 8, "eval_samples": 4,
                            "seq_len": 16, "ppl_data": str(text), "ppl_seq_len": 64, "ppl_windows": 2,
                            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3}})
    summary = qat_verb(cfg, RunOptions(out=str(tmp_path / "run")))
    assert summary["steps"] == 3 and summary["data_free"]
    assert summary["kd_rtn"] > 0 and summary["kd_qat"] > 0
    assert all(summary[k] > 1 for k in ("ppl_fp", "ppl_rtn", "ppl_qat")) and "ppl_qat_fake" not in summary
    assert "QAT W3 g32" in capsys.readouterr().out
    assert len((tmp_path / "run" / "samples.jsonl").read_text().splitlines()) == 8
    loaded, _ = load_model(summary["saved"])
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    marker = json.loads((tmp_path / "run" / "model" / "llmlab_quantization.json").read_text())
    assert len(marker["modules"]) == 14


def test_qat_verb_with_activations_and_kv_kept_fake(tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("pack my box with five dozen liquor jugs. " * 40)
    cfg = build(QATConfig, {"model": "tiny-llama", "bits": 4, "group_size": 32, "act_bits": 8, "kv_bits": 4,
                            "n_samples": 4, "eval_samples": 0, "seq_len": 16, "convert": False,
                            "ppl_data": str(text), "ppl_seq_len": 64, "ppl_windows": 1,
                            "train": {"max_steps": 1, "batch_size": 4}})
    summary = qat_verb(cfg, RunOptions(out=str(tmp_path / "run")))
    assert summary["saved"] is None and summary["kd_rtn"] is None and "ppl_qat" not in summary
    assert summary["ppl_qat_fake"] > 1 and summary["act_bits"] == 8 and summary["kv_bits"] == 4


@pytest.mark.parametrize("bad, message", [
    ({"bits": 9}, "--bits must be an integer from 2 to 8"),
    ({"bits": 1}, "--bits must be an integer from 2 to 8"),
    ({"act_bits": 16}, "--act-bits must be an integer from 2 to 8"),
    ({"kv_bits": 1}, "--kv-bits must be an integer from 2 to 8"),
    ({"n_samples": 0}, "--n-samples must be at least 1"),
    ({"train": {"max_steps": 0}}, "--train.max-steps must be at least 1"),
    ({"train": {"max_steps": -5}}, "--train.max-steps must be at least 1"),
    ({"greedy_tokens": [0]}, "--greedy-tokens"),
    ({"skip": ["("]}, "not a valid regex"),
])
def test_bad_input_is_a_one_line_error(bad, message):
    with pytest.raises(LlmlabError, match=message) as error:
        build(QATConfig, bad)
    assert "\n" not in str(error.value)


def test_bad_model_inputs():
    gpt2, _ = load_model("tiny-gpt2")
    with pytest.raises(LlmlabError, match="--kv-bits needs separate k_proj/v_proj"):
        prepare_qat(gpt2, QATSpec(bits=4, group_size=32, kv_bits=8))
    model, tokenizer = load_model("tiny-llama")
    with pytest.raises(LlmlabError, match="longer than the model's context"):
        generate_data(model, tokenizer, 2, 10_000)

import copy

import pytest
import torch
from torch import nn

from llmlab.compress.smoothquant import (SmoothQuantConfig, activation_absmax, fold, quantize_smoothquant, smooth_model,
                                         smoothing_scales)
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.models.packed.io import load_quantized, save_quantized
from llmlab.models.packed.qlinear import quantized_linears
from llmlab.models.packed.w8a8 import W8A8Linear

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def outlier_block(seed=0):
    """LayerNorm(64) -> two linears, with norm weights x40 on channels 2, 9, 30: the activation outliers
    of real LLMs (Fig. 4 of the paper) sit in a few channels, from the norm's weight."""
    torch.manual_seed(seed)
    norm, q, k = nn.LayerNorm(64), nn.Linear(64, 48), nn.Linear(64, 32)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64))
        norm.weight[[2, 9, 30]] *= 40
        norm.bias.normal_(0, 0.1)
    return norm, q, k, torch.randn(128, 64)


def hand_w8a8(x, W, b, static_scale=None):
    """Per-token int8 activations x per-channel int8 weights, written out in float64."""
    x, W = x.double(), W.double()
    d_w = W.abs().amax(1) / 127                                    # (out,)
    d_x = x.abs().amax(1) / 127 if static_scale is None else torch.full((x.shape[0],), float(static_scale))
    X_q = torch.round(x / d_x[:, None]).clamp(-127, 127)
    W_q = torch.round(W / d_w[:, None])
    return torch.outer(d_x, d_w) * (X_q @ W_q.T) + b.double()


def test_w8a8_layer_is_the_equation():
    norm, q, _, x = outlier_block()
    layer = W8A8Linear.from_float(q)
    torch.testing.assert_close(layer(x).double(), hand_w8a8(x, q.weight.detach(), q.bias.detach()), rtol=0, atol=1e-5)
    W8A8Linear.use_int_mm = False  # the float route (what groups take) gives the same numbers
    try:
        torch.testing.assert_close(layer(x).double(), hand_w8a8(x, q.weight.detach(), q.bias.detach()),
                                   rtol=0, atol=1e-5)
    finally:
        W8A8Linear.use_int_mm = True


def test_static_per_tensor_activation_scale():
    _, q, _, x = outlier_block()
    layer = W8A8Linear.from_float(q, act_scale="per_tensor", input_absmax=x.abs().amax(0) * 0.5)
    scale = x.abs().max() * 0.5 / 127  # calibrated on half the range: the rest clips at ±127
    assert layer.input_scale.item() == pytest.approx(scale.item())
    torch.testing.assert_close(layer(x).double(), hand_w8a8(x, q.weight.detach(), q.bias.detach(), scale),
                               rtol=0, atol=1e-5)


def test_smoothing_scales_and_folding_are_the_paper_equation():
    norm, q, k, x = outlier_block()
    h = norm(x).detach()
    x_max = h.abs().amax(0)
    s = smoothing_scales(x_max, [q.weight, k.weight], alpha=0.5)
    w_max = torch.maximum(q.weight.abs().amax(0), k.weight.abs().amax(0))
    torch.testing.assert_close(s, (x_max.sqrt() / w_max.sqrt()), rtol=1e-6, atol=0)
    before = q(h), k(h)
    with torch.no_grad():
        fold(norm, [q, k], s)
        h2 = norm(x)
    torch.testing.assert_close(h2.abs().amax(0), x_max / s, rtol=1e-5, atol=1e-6)  # X diag(s)^-1
    after = q(h2), k(h2)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # Y unchanged in float
    # alpha = 0.5 balances them: each channel's max |X_j / s_j| = max |W_j s_j|
    new_w = torch.maximum(q.weight.abs().amax(0), k.weight.abs().amax(0))
    torch.testing.assert_close(h2.abs().amax(0), new_w, rtol=1e-5, atol=1e-6)


def test_smoothing_reduces_the_w8a8_error():
    norm, q, _, x = outlier_block()
    with torch.no_grad():
        h = norm(x)
        exact = q(h)
        plain = (W8A8Linear.from_float(q)(h) - exact).abs().mean().item()
        s = smoothing_scales(h.abs().amax(0), [q.weight], alpha=0.5)
        norm2, q2 = copy.deepcopy(norm), copy.deepcopy(q)
        fold(norm2, [q2], s)
        smoothed = (W8A8Linear.from_float(q2)(norm2(x)) - exact).abs().mean().item()
    assert smoothed < plain / 2.5, (smoothed, plain)  # 0.018 vs 0.056 here


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-opt", "tiny-gpt2", "tiny-gpt-neox"])
def test_smoothing_alone_keeps_the_float_logits(spec):
    model, _ = load_model(spec)
    with torch.no_grad():
        for m in model.modules():  # outlier channels, so that s is far from 1
            if "norm" in type(m).__name__.lower() or isinstance(m, nn.LayerNorm):
                m.weight[:4] *= 30
        before = model(IDS).logits
        norms = {n: p.clone() for n, p in model.named_parameters() if "norm" in n or "ln_" in n}
        smooth_model(model, activation_absmax(model, IDS), 0.5, IDS[:1])
        changed = [n for n, p in model.named_parameters() if n in norms and not torch.equal(p, norms[n])]
        assert len(changed) >= 4  # two norms per layer at least (weights; biases too where they exist)
        torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=1e-5)


def test_post_norm_blocks_are_refused_and_left_as_they_were():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                     do_layer_norm_before=False)).eval()  # OPT-350m's post-LN block
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1, 0.3)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(LlmlabError, match="smooth: false"):
        quantize_smoothquant(model, IDS, SmoothQuantConfig())
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, state[name], rtol=1e-6, atol=1e-7)
    assert not quantized_linears(model)


def test_tiny_llama_end_to_end_and_round_trip(tmp_path):
    model, tok = load_model("tiny-llama")
    exact = model(IDS).logits
    quantize_smoothquant(model, IDS, SmoothQuantConfig(alpha=0.8, act_scale="per_tensor"))
    layers = quantized_linears(model)
    assert len(layers) == 14 and all(type(m) is W8A8Linear for m in layers.values())
    out = model(IDS).logits
    assert (out - exact).abs().max() < 0.02 * exact.abs().max()
    save_quantized(model, tok, tmp_path / "sq")
    loaded, _ = load_quantized(tmp_path / "sq")
    assert loaded.get_submodule("model.layers.0.mlp.up_proj").config() == {
        "bits": 8, "group_size": 0, "act_scale": "per_tensor"}
    assert torch.equal(loaded(IDS).logits, out)  # smoothed norms, int8 weights and static scales all saved


def test_bf16_model():
    model, _ = load_model("tiny-llama", dtype="bf16")
    exact = model(IDS).logits.float()
    quantize_smoothquant(model, IDS, SmoothQuantConfig())  # bf16 rounding of the fold must not trip the check
    out = model(IDS).logits
    assert out.dtype == torch.bfloat16
    assert (out.float() - exact).abs().mean() < 0.05 * exact.abs().mean()


def test_w4_weights_are_stored_two_per_byte():
    _, q, _, x = outlier_block()
    layer = W8A8Linear.from_float(q, bits=4)
    assert layer.qweight.shape == (48, 32) and layer.int_weight().abs().max() <= 7
    torch.testing.assert_close(layer.dequantized_weight(), layer.int_weight().float() * layer.scales, rtol=0, atol=0)


@pytest.mark.parametrize("options, message", [
    ({"alpha": 1.5}, "alpha must be in"), ({"alpha": -0.1}, "alpha must be in"),
    ({"bits": 3}, "bits 8 or 4"), ({"act_scale": "per_channel"}, "act_scale must be"),
    ({"group_size": -1}, "group_size must be"), ({"skip": ["("]}, "not a valid regex")])
def test_bad_config(options, message):
    with pytest.raises(LlmlabError, match=message):
        SmoothQuantConfig(**options)


def test_needs_calibration_unless_plain_dynamic():
    model, _ = load_model("tiny-llama")
    with pytest.raises(LlmlabError, match="calibration"):
        quantize_smoothquant(model, None, SmoothQuantConfig())
    assert not quantized_linears(model)
    quantize_smoothquant(model, None, SmoothQuantConfig(smooth=False))  # plain W8A8 needs no data
    assert len(quantized_linears(model)) == 14


@pytest.mark.slow
def test_builtin_model_keeps_its_perplexity():
    from llmlab.compress.calibrate import calibration_data
    from llmlab.evaluate.perplexity import perplexity
    from tests.conftest import WIKITEXT

    model, tok = load_model("smollm2-135m")
    text = WIKITEXT.read_text(encoding="utf-8")
    calib, test = text[:len(text) // 2], text[len(text) // 2:][:20000]
    fp = perplexity(model, tok, test, seq_len=512, max_windows=2, progress=False)["ppl"]
    quantize_smoothquant(model, calibration_data(tok, calib, n_samples=8, seq_len=512), SmoothQuantConfig())
    q = perplexity(model, tok, test, seq_len=512, max_windows=2, progress=False)["ppl"]
    assert abs(q / fp - 1) < 0.05, (fp, q)

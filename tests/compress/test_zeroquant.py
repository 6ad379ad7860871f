import pytest
import torch
from torch import nn

from llmlab.compress.zeroquant import ZeroQuantConfig, quantize_zeroquant
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.models.packed.io import load_quantized, save_quantized
from llmlab.models.packed.qlinear import quantized_linears
from llmlab.models.packed.w8a8 import W8A8Linear

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def toy(seed=0):
    """A 64 -> 16 linear whose input columns have very different ranges (x0.1 to x10 per block of 16)."""
    torch.manual_seed(seed)
    linear = nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight *= torch.tensor([0.1, 1.0, 10.0, 0.3]).repeat_interleave(16)
    return linear, torch.randn(40, 64)


def hand_zeroquant(x, W, b, bits, group_size):
    """Group-wise symmetric weights, token-wise 8-bit activations, in float64."""
    x, W = x.double(), W.double()
    out, n_in = W.shape
    G = W.reshape(out, n_in // group_size, group_size)               # (out, groups, gs)
    d_w = G.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    W_hat = (torch.round(G / d_w) * d_w).reshape(out, n_in)
    d_x = x.abs().amax(1, keepdim=True) / 127                         # one scale per token
    X_hat = torch.round(x / d_x) * d_x
    return X_hat @ W_hat.T + b.double(), W_hat


@pytest.mark.parametrize("bits, group_size", [(8, 16), (4, 16), (4, 32), (8, 64)])
def test_layer_is_the_equation(bits, group_size):
    linear, x = toy()
    layer = W8A8Linear.from_float(linear, bits, group_size)
    expected, W_hat = hand_zeroquant(x, linear.weight.detach(), linear.bias.detach(), bits, group_size)
    torch.testing.assert_close(layer.dequantized_weight().double(), W_hat, rtol=0, atol=1e-7)
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-5)
    assert layer.scales.shape == (16, 64 // group_size)
    assert layer.qweight.shape == (16, 64 * bits // 8)  # W4: two weights per byte


def test_groups_beat_one_scale_per_row():
    linear, _ = toy()
    W = linear.weight.detach()

    def column_error(group_size):  # mean over input columns of the relative error of that column
        W_hat = W8A8Linear.from_float(linear, 4, group_size).dequantized_weight()
        return ((W_hat - W).abs().sum(0) / W.abs().sum(0)).mean().item()

    # one scale per row is set by the x10 columns and rounds most of the x0.1 and x0.3 ones to 0
    per_row, grouped = column_error(0), column_error(16)
    assert grouped < per_row / 4, (grouped, per_row)


def test_tiny_llama_end_to_end_and_round_trip(tmp_path):
    model, tok = load_model("tiny-llama")
    exact = model(IDS).logits
    quantize_zeroquant(model, None, ZeroQuantConfig(bits=4, group_size=32, skip=["lm_head", r"down_proj"]))
    layers = quantized_linears(model)
    assert len(layers) == 2 * 6 and all(m.config() == {"bits": 4, "group_size": 32, "act_scale": "per_token"}
                                        for m in layers.values())
    out = model(IDS).logits
    assert (out - exact).abs().max() < 0.1 * exact.abs().max()
    save_quantized(model, tok, tmp_path / "zq")
    loaded, _ = load_quantized(tmp_path / "zq")
    assert torch.equal(loaded(IDS).logits, out)


def test_w8_per_channel_is_close_to_float():
    model, _ = load_model("tiny-llama")
    exact = model(IDS).logits
    quantize_zeroquant(model, None, ZeroQuantConfig(bits=8, group_size=0))
    assert (model(IDS).logits - exact).abs().max() < 0.01 * exact.abs().max()


@pytest.mark.parametrize("options, message", [
    ({"bits": 3}, "bits 8 or 4"), ({"bits": 16}, "bits 8 or 4"), ({"group_size": -2}, "group_size must be")])
def test_bad_config(options, message):
    with pytest.raises(LlmlabError, match=message):
        ZeroQuantConfig(**options)


def test_bad_group_size_and_requantizing_are_refused():
    model, _ = load_model("tiny-llama")
    quantize_zeroquant(model, None, ZeroQuantConfig(group_size=64))
    with pytest.raises(LlmlabError, match="already quantized"):
        quantize_zeroquant(model, None, ZeroQuantConfig(group_size=64))


@pytest.mark.slow
def test_builtin_model_keeps_its_perplexity():
    from llmlab.evaluate.perplexity import perplexity
    from tests.conftest import WIKITEXT

    model, tok = load_model("smollm2-135m")
    text = WIKITEXT.read_text(encoding="utf-8")[:20000]
    fp = perplexity(model, tok, text, seq_len=512, max_windows=2, progress=False)["ppl"]
    quantize_zeroquant(model, None, ZeroQuantConfig(bits=8, group_size=64))  # 128 does not divide 576
    q = perplexity(model, tok, text, seq_len=512, max_windows=2, progress=False)["ppl"]
    assert abs(q / fp - 1) < 0.05, (fp, q)  # W8A8 costs ~3% here (activation rounding)

import pytest
import torch
from torch import nn

from llmlab.compress.llm_int8 import LLMInt8Config, quantize_llm_int8
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.models.layers import decoder_layers
from llmlab.models.packed.io import load_quantized, save_quantized
from llmlab.models.packed.qlinear import quantized_linears
from llmlab.models.packed.w8a8 import LLMInt8Linear

OUTLIERS = [3, 17]


def toy(seed=0, n=20):
    """A 64 -> 24 linear and inputs whose feature dimensions 3 and 17 hold systematic outliers (|x| ~ 20)."""
    torch.manual_seed(seed)
    linear = nn.Linear(64, 24)
    x = torch.randn(n, 64)
    x[:, OUTLIERS] = 20 * torch.sign(torch.randn(n, len(OUTLIERS))) * (1 + torch.rand(n, len(OUTLIERS)))
    return linear, x


def paper_int8(x, W, b, alpha):
    """Eq. of §3.2 written out in float64: outlier dimensions in float, the rest vector-wise int8."""
    x, W, b = x.double(), W.double(), b.double()
    O = [j for j in range(x.shape[1]) if (x[:, j].abs() >= alpha).any()]
    c_w = W.abs().amax(1) / 127                             # (out,) one scale per weight row
    W_q = torch.round(W / c_w[:, None])                     # (out, in) in [-127, 127]
    X_r = x.clone()
    X_r[:, O] = 0
    c_x = X_r.abs().amax(1) / 127                           # (N,) one scale per token, outliers left out
    X_q = torch.round(X_r / c_x[:, None])
    Y = torch.outer(c_x, c_w) * (X_q @ W_q.T)               # (N, out) the int32 product, rescaled
    Y += x[:, O] @ (W_q[:, O] * c_w[:, None]).T              # outlier columns, weights dequantized from int8
    return Y + b, O, W_q


def test_layer_is_the_paper_equation():
    linear, x = toy()
    layer = LLMInt8Linear.from_float(linear, threshold=6.0)
    expected, O, W_q = paper_int8(x, linear.weight.detach(), linear.bias.detach(), 6.0)
    assert O == OUTLIERS
    assert torch.equal(layer.int_weight(), W_q.to(torch.int8))
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=2e-5)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (24, 64)  # one byte per weight


def test_decomposition_error_is_far_below_plain_int8():
    linear, x = toy(n=64)
    mixed, plain = LLMInt8Linear.from_float(linear, 6.0), LLMInt8Linear.from_float(linear, float("inf"))
    with torch.no_grad():
        exact, w_only = linear(x), x @ mixed.dequantized_weight().T + linear.bias  # float; int8 weights only
        y_mixed, y_plain = mixed(x), plain(x)
    # outliers of ~30 stretch each token's int8 step ~10x: every regular feature is rounded 10x coarser;
    # taking the two outlier dimensions out restores the fine grid. Against x·Ŵᵀ (the activation
    # rounding alone) the decomposition gains ~10x; against the float output, where both keep the
    # int8 weights' error, it still gains >3x.
    act_mixed, act_plain = (y_mixed - w_only).abs().mean().item(), (y_plain - w_only).abs().mean().item()
    assert act_mixed < act_plain / 8, (act_mixed, act_plain)
    err_mixed, err_plain = (y_mixed - exact).abs().mean().item(), (y_plain - exact).abs().mean().item()
    assert err_mixed < err_plain / 3, (err_mixed, err_plain)


def test_int_mm_fallback_gives_the_same_numbers(monkeypatch):
    linear, x = toy()
    layer = LLMInt8Linear.from_float(linear)
    expected = layer(x)

    def refuse(a, b):
        raise RuntimeError("self.size(0) needs to be greater than 16")

    monkeypatch.setattr(torch, "_int_mm", refuse)
    assert torch.equal(layer(x), expected)


def test_gradient_flows_to_the_input_through_the_dequantized_weight():
    linear, x = toy()
    layer = LLMInt8Linear.from_float(linear)
    x.requires_grad_(True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand_as(x), rtol=0, atol=1e-6)


def planted_llama():
    """tiny-llama whose input norms blow up features 5 and 40 (x20, to |x| ~ 50): the outliers LLMs grow at scale."""
    model, tok = load_model("tiny-llama")
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.input_layernorm.weight[[5, 40]] *= 20
    return model, tok


def test_tiny_llama_end_to_end(tmp_path):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    model, tok = planted_llama()
    exact = model(ids).logits
    plain, _ = planted_llama()
    quantize_llm_int8(plain, None, LLMInt8Config(threshold=float("inf")))
    quantize_llm_int8(model, None, LLMInt8Config(threshold=6.0, skip=[r"\.0\.mlp\.down_proj$"]))
    layers = quantized_linears(model)
    assert len(layers) == 2 * 7 - 1 and "model.layers.0.mlp.down_proj" not in layers
    assert all(isinstance(m, LLMInt8Linear) for m in layers.values())
    out = model(ids).logits
    err_mixed, err_plain = (out - exact).abs().max().item(), (plain(ids).logits - exact).abs().max().item()
    # both keep the int8 weights' error, which the outliers (x ~ 50) magnify: the model-level gain is ~2.7x
    assert err_mixed < 0.02 * exact.abs().max().item()
    assert err_mixed < err_plain / 2, (err_mixed, err_plain)

    save_quantized(model, tok, tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    assert isinstance(loaded.get_submodule("model.layers.1.self_attn.q_proj"), LLMInt8Linear)
    assert torch.equal(loaded(ids).logits, out)
    assert model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("threshold", [0.0, -6.0, float("nan")])
def test_bad_threshold(threshold):
    with pytest.raises(LlmlabError, match="threshold must be > 0"):
        LLMInt8Config(threshold=threshold)


def test_refuses_an_already_quantized_model():
    model, _ = load_model("tiny-llama")
    quantize_llm_int8(model)
    with pytest.raises(LlmlabError, match="already quantized"):
        quantize_llm_int8(model)


@pytest.mark.slow
def test_builtin_model_keeps_its_perplexity():
    from llmlab.evaluate.perplexity import perplexity
    from tests.conftest import WIKITEXT

    model, tok = load_model("smollm2-135m")
    text = WIKITEXT.read_text(encoding="utf-8")[:20000]
    fp = perplexity(model, tok, text, seq_len=512, max_windows=2, progress=False)["ppl"]
    quantize_llm_int8(model)
    q = perplexity(model, tok, text, seq_len=512, max_windows=2, progress=False)["ppl"]
    assert abs(q / fp - 1) < 0.02, (fp, q)

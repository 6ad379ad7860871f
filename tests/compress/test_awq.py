import math
from copy import deepcopy

import pytest
import torch

from llmlab.compress.awq import AWQConfig, Tie, _fold, apply_awq_scales, quantize_awq, scaling_groups, search_scale
from llmlab.compress.calibrate import InputStats, calibration_data
from llmlab.errors import LlmlabError
from llmlab.models import decoder_layers, load_model
from llmlab.models.packed.qlinear import QuantLinear, quantized_linears
from llmlab.models.packed.quant import QuantSpec, fake_quantize

TEXT = "Activation-aware scaling protects the weights that meet the largest activations. " * 40


def outlier_inputs():
    """X (512, 64) with four input channels twenty times larger than the rest, and W (32, 64)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=gen)
    X[:, [3, 17, 40, 41]] *= 20
    return X, torch.randn(32, 64, generator=gen)


def awq_error(X, W, spec, grid):
    stats = InputStats()
    stats.add(X, xtx=True)
    s = search_scale([W], (stats.xtx / stats.n).float(), (stats.abs_sum / stats.n).float(), spec, grid)
    return torch.linalg.norm(X @ W.T - (X / s) @ fake_quantize(W * s, spec).T), s


@pytest.mark.parametrize("bits,group_size", [(4, 0), (4, 16), (3, 16)])
def test_awq_beats_rtn_on_a_layer_with_outlier_channels(bits, group_size):
    X, W = outlier_inputs()
    spec = QuantSpec(bits, group_size)
    rtn = torch.linalg.norm(X @ W.T - X @ fake_quantize(W, spec).T)
    awq, s = awq_error(X, W, spec, grid=20)
    assert awq < 0.7 * rtn, (awq, rtn)  # measured: 0.58-0.60
    outliers = torch.zeros(64, dtype=torch.bool)
    outliers[[3, 17, 40, 41]] = True
    assert s[outliers].min() > 2 * s[~outliers].max()  # the outlier channels get the largest scales
    only_alpha_0, s0 = awq_error(X, W, spec, grid=1)  # the grid {0} is RTN exactly
    assert torch.equal(s0, torch.ones(64)) and torch.isclose(only_alpha_0, rtn)


def test_tie_for_grouped_query_attention():
    tie = Tie(n_kv=2, n_rep=3, head_dim=4)
    s = torch.arange(1.0, 9.0)  # one per v channel: kv head 0 -> 1..4, kv head 1 -> 5..8
    full = tie.expand(s)  # query heads 0-2 read kv head 0, heads 3-5 kv head 1
    assert torch.equal(full, torch.tensor([1., 2, 3, 4] * 3 + [5., 6, 7, 8] * 3))
    assert torch.equal(tie.pick(full), s) and torch.equal(tie.reduce(full), s)


def test_folded_scales_leave_the_float_model_unchanged(tiny_llama):
    model, tok = deepcopy(tiny_llama[0]), tiny_llama[1]
    ids = calibration_data(tok, TEXT, n_samples=2, seq_len=64)
    with torch.no_grad():
        before = model(ids).logits
    gen = torch.Generator().manual_seed(0)
    for layer in decoder_layers(model):  # arbitrary positive scales on every group, GQA tie included
        for prev, names, tie in scaling_groups(layer):
            width = layer.get_submodule(names[0]).in_features
            s = torch.rand(width // (tie.n_rep if tie else 1), generator=gen) * 4 + 0.25
            _fold(layer.get_submodule(prev), [layer.get_submodule(n) for n in names], tie.expand(s) if tie else s, tie)
    assert scaling_groups(decoder_layers(model)[0])[1][2] == Tie(n_kv=2, n_rep=2, head_dim=16)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
        assert not torch.allclose(model.model.layers[0].self_attn.o_proj.weight,
                                  tiny_llama[0].model.layers[0].self_attn.o_proj.weight)


def test_searched_scales_leave_the_float_model_unchanged(tiny_llama):
    model, tok = deepcopy(tiny_llama[0]), tiny_llama[1]
    calib = calibration_data(tok, TEXT, n_samples=4, seq_len=64)
    with torch.no_grad():
        before = model(calib).logits
        apply_awq_scales(model, calib, AWQConfig(bits=3, group_size=16))
        assert torch.allclose(model(calib).logits, before, atol=1e-5)
    assert not quantized_linears(model)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))  # α > 0 was chosen


def test_tiny_llama_end_to_end(tiny_llama):
    from llmlab.evaluate.perplexity import perplexity

    model, tok = deepcopy(tiny_llama[0]), tiny_llama[1]
    calib = calibration_data(tok, TEXT, n_samples=8, seq_len=64)
    fp = perplexity(model, tok, TEXT, seq_len=128, max_windows=4, progress=False)["ppl"]
    quantize_awq(model, calib, AWQConfig(bits=4, group_size=32, skip=[r"\.0\.mlp\.down_proj"]))
    layers = quantized_linears(model)
    assert len(layers) == 13 and "model.layers.0.mlp.down_proj" not in layers
    assert all(isinstance(m, QuantLinear) and m.spec.bits == 4 for m in layers.values())
    q = perplexity(model, tok, TEXT, seq_len=128, max_windows=4, progress=False)["ppl"]
    assert math.isfinite(q) and abs(q / fp - 1) < 0.1, (fp, q)


def test_bad_input():
    with pytest.raises(LlmlabError, match="bits must be an integer from 2 to 8"):
        AWQConfig(bits=1)
    with pytest.raises(LlmlabError, match="grid"):
        AWQConfig(grid=0)
    model, tok = load_model("tiny-gpt2")
    calib = calibration_data(tok, TEXT, n_samples=2, seq_len=16)
    with pytest.raises(LlmlabError, match="AWQ supports LLaMA-style decoder blocks"):
        quantize_awq(model, calib, AWQConfig(group_size=32))
    llama = quantize_awq(load_model("tiny-llama")[0], calib, AWQConfig(group_size=48))  # 48 divides neither 64
    assert {m.scales.shape[1] for m in quantized_linears(llama).values()} == {2, 4}  # nor 128: groups of 32

"""NF4 with double quantization (QLoRA): the code books, the blockwise round trip, the double
quantization of the absmax constants, bits per parameter, the layer, and parity with bitsandbytes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.compress import quantize_model
from llmlab.compress.nf4 import NF4Config, bits_per_parameter, quantize_nf4
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.models.packed.io import load_quantized, save_quantized
from llmlab.models.packed.nf4 import DYNAMIC, NF4, NF4Linear, dequantize_blockwise
from llmlab.models.packed.qlinear import quantized_linears

# QLoRA, Appendix E ("NormalFloat 4-bit data type"): the exact values of the data type
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def linear(out_features=96, in_features=160, seed=0, bias=True):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-1, 1, out_features)[:, None])  # blocks of very different absmax
    return layer


def test_code_book_is_the_papers_and_rederives_from_normal_quantiles():
    assert NF4.tolist() == PAPER_NF4
    # §3: 2^(k-1) quantiles of N(0,1) for the positive half and 2^(k-1)-1 for the negative half (so that
    # 0 is exact), at probabilities spaced evenly from offset δ = 0.9677083 to 1/2, scaled to [-1, 1]
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    torch.testing.assert_close(NF4, (values / values.max()).float(), atol=1e-7, rtol=0)
    assert (NF4 > 0).sum() == 8 and (NF4 < 0).sum() == 7 and NF4[7] == 0


def test_dynamic_code_is_the_signed_8bit_tree():
    assert DYNAMIC.shape == (256,) and torch.all(DYNAMIC[1:] > DYNAMIC[:-1])  # sorted, all distinct
    assert DYNAMIC[-1] == 1 and (DYNAMIC == 0).sum() == 1 and (DYNAMIC > 0).sum() == 128
    # the finest step, 10^-6 * 0.9: dynamic range of 10^6 with a linear fraction in each decade
    torch.testing.assert_close(DYNAMIC[DYNAMIC > 0].min(), torch.tensor(0.55e-6), atol=1e-12, rtol=1e-5)


def test_round_trip_is_the_nearest_code_times_the_block_absmax():
    layer = linear()
    w = layer.weight.detach()
    nf4 = NF4Linear.from_float(layer, NF4Config(double_quant=False))
    blocks = w.reshape(-1, 64)  # 96*160 = 240 blocks of 64 consecutive weights (row-major)
    absmax = blocks.abs().amax(-1, keepdim=True)
    nearest = (blocks / absmax)[..., None].sub(NF4).abs().argmin(-1)  # argmin_j |NF4_j - w / absmax|
    expected = (NF4[nearest] * absmax).reshape(w.shape)
    assert torch.equal(nf4.dequantized_weight(), expected)
    # the largest gap of the code book (-1 .. -0.6962) bounds the error: half of it times the absmax
    err = (nf4.dequantized_weight() - w).reshape(-1, 64).abs()
    assert torch.all(err <= (NF4[1] - NF4[0]) / 2 * absmax * (1 + 1e-6))
    assert torch.all(nf4.dequantized_weight().reshape(-1, 64).abs().amax(-1, keepdim=True) == absmax)  # ±1 exact


def test_double_quantization_reconstructs_the_absmax():
    layer = linear(out_features=300, in_features=256)  # 1200 blocks -> 5 double-quant blocks (the last partial)
    exact = NF4Linear.from_float(layer, NF4Config(double_quant=False)).absmax
    nf4 = NF4Linear.from_float(layer)
    assert nf4.absmax_q.dtype == torch.uint8 and nf4.absmax_q.shape == (1200,) and nf4.absmax_scale.shape == (5,)
    torch.testing.assert_close(nf4.absmax_mean, exact.mean().reshape(1), atol=0, rtol=0)  # μ kept in fp32
    # c₁ of each group of 256 is the absmax of the centred constants, and DYN[q₂]·c₁ + μ the nearest code
    centred = F.pad(exact - exact.mean(), (0, 80)).reshape(5, 256)
    assert torch.equal(nf4.absmax_scale, centred.abs().amax(-1))
    half_gap = (DYNAMIC[1:] - DYNAMIC[:-1]).max() / 2
    error = (nf4.block_absmax() - exact).abs()
    assert torch.all(error <= half_gap * nf4.absmax_scale.repeat_interleave(256)[:1200] + 1e-7)
    nearest = ((exact - exact.mean()) / nf4.absmax_scale.repeat_interleave(256)[:1200])[:, None]
    assert torch.equal(nf4.absmax_q.long(), (nearest - DYNAMIC).abs().argmin(-1))
    # for weights of one scale (no spread of 100 between rows as above) the constants are close to exact
    plain = nn.Linear(256, 300)
    exact = NF4Linear.from_float(plain, NF4Config(double_quant=False)).absmax
    assert ((NF4Linear.from_float(plain).block_absmax() - exact).abs() / exact).max() < 0.01


def test_bits_per_parameter():
    layer = linear(out_features=256, in_features=1024, bias=False)
    n = 256 * 1024
    assert NF4Linear.from_float(layer).bits_per_parameter() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n)
    assert NF4Linear.from_float(layer).bits_per_parameter() == pytest.approx(4.127, abs=5e-4)
    assert NF4Linear.from_float(layer, NF4Config(double_quant=False)).bits_per_parameter() == 4.5


def test_forward_dequantizes_to_the_compute_dtype():
    layer = linear()
    x = torch.randn(3, 5, 160)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        nf4 = NF4Linear.from_float(layer, NF4Config(compute_dtype=name))
        y = nf4(x)
        assert y.dtype == torch.float32 and y.shape == (3, 5, 96)
        w = nf4.dequantized_weight()
        assert torch.equal(y, F.linear(x.to(dtype), w.to(dtype), layer.bias.detach().to(dtype)).float())
    rel = (nf4(x) - layer(x)).norm() / layer(x).norm()
    assert 0.01 < rel < 0.15  # 4-bit: a real but small error


def test_parity_with_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional")
    layer = linear(out_features=300, in_features=250, bias=False)  # blocks cross rows; the last one is partial
    w = layer.weight.detach()
    # first level: the same codes (bitsandbytes packs the first value in the high nibble), the same weights
    q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = NF4Linear.from_float(layer, NF4Config(double_quant=False))
    assert torch.equal(((ours.qweight & 0xF) << 4) | (ours.qweight >> 4), q.flatten())
    assert torch.equal(ours.dequantized_weight(), bnb.dequantize_4bit(q, state))
    # double quantization: the same mean, block scales and dequantization formula
    q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = NF4Linear.from_float(layer)
    assert torch.equal(ours.absmax_mean, state.offset.reshape(1)) and torch.equal(ours.absmax_scale, state.state2.absmax)
    assert torch.equal(state.state2.code, DYNAMIC)
    codes = torch.stack([q.flatten() >> 4, q.flatten() & 0xF], -1).flatten()  # (numel,) in order
    theirs_absmax = dequantize_blockwise(state.absmax, state.state2.absmax, DYNAMIC, 256) + state.offset
    assert torch.equal(dequantize_blockwise(codes, theirs_absmax, NF4, 64).reshape(w.shape),
                       bnb.dequantize_4bit(q, state))
    # bitsandbytes' CPU kernel finds the 8-bit code by an approximate binary search that can miss the
    # nearest code right at a midpoint; llmlab (like bitsandbytes' torch backend) always takes the nearest
    differ = ours.absmax_q != state.absmax
    assert differ.float().mean() < 0.01
    target = (ours.block_absmax() - ours.absmax_mean) / ours.absmax_scale.repeat_interleave(256)[:len(differ)]
    assert torch.all((DYNAMIC[ours.absmax_q.long()] - target).abs() <= (DYNAMIC[state.absmax.long()] - target).abs())
    same = differ.repeat_interleave(64)[:w.numel()].reshape(w.shape) == 0
    assert torch.equal(ours.dequantized_weight()[same], bnb.dequantize_4bit(q, state)[same])


def test_quantize_nf4_on_tiny_llama_saves_and_loads(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    ids = torch.tensor([[5, 80, 81, 82, 90, 100]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    quantize_model(model, "nf4")  # through the METHODS table
    layers = quantized_linears(model)
    assert len(layers) == 14 and all(isinstance(m, NF4Linear) for m in layers.values())
    assert isinstance(model.lm_head, nn.Linear) and model.llmlab_quant_method == "nf4"
    # per layer: n/2 bytes of codes, one byte per block of 64, 4 per group of 256 blocks and 4 for the mean
    sizes = [m.in_features * m.out_features for m in layers.values()]
    stored = sum(n / 2 + n / 64 + 4 * -(-n // (64 * 256)) + 4 for n in sizes)
    assert bits_per_parameter(model) == pytest.approx(8 * stored / sum(sizes))  # 4.137 on these tiny layers
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert 0 < (after - before).abs().max() < 0.1
    save_quantized(model, tokenizer, tmp_path / "nf4")
    loaded, _ = load_quantized(tmp_path / "nf4")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, after)
    with pytest.raises(LlmlabError, match="already quantized"):
        quantize_nf4(loaded)


def test_skip_and_bad_options():
    model, _ = load_model("tiny-llama")
    quantize_nf4(model, None, NF4Config(skip=[r"mlp\."]))
    assert set(n.rsplit(".", 1)[-1] for n in quantized_linears(model)) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    for bad in ({"block_size": 0}, {"dq_block_size": 255}, {"compute_dtype": "int8"}, {"skip": ["("]}):
        with pytest.raises(LlmlabError):
            NF4Config(**bad)


def test_quantize_cli_nf4(tmp_path):
    from llmlab.cli import main

    assert main(["quantize", "--model", "tiny-llama", "--method", "nf4", "--options.block-size", "32",
                 "--out", "q"]) == 0
    model, _ = load_model("q")  # the run folder's model/ is a quantized folder
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, NF4Linear) and layer.block_size == 32 and layer.absmax_q.shape == (128 * 64 // 32,)
    assert main(["quantize", "--model", "tiny-llama", "--method", "nf4", "--bits", "4", "--out", "q2"]) == 2

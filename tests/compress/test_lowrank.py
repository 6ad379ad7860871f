import copy
import json

import pytest
import torch
from torch import nn

from llmlab.compress import quantize_model
from llmlab.compress.calibrate import observe
from llmlab.compress.lowrank import LowRankConfig, add_lorc, decompose, factorize, lowrank_linear
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.models.packed.io import LOWRANK_MARKER as MARKER
from llmlab.models.packed.io import MARKER as QUANT_MARKER
from llmlab.models.packed.io import load_decomposed, save_decomposed, save_quantized
from llmlab.models.packed.lowrank import LoRCLinear, LowRankLinear
from llmlab.models.packed.qlinear import QuantizedLinear, quantized_linears
from llmlab.stages.decompose import DecomposeConfig, decompose_verb

G = torch.Generator().manual_seed(0)
W = torch.randn(24, 40, generator=G)
CALIB = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(1))
X = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))


def test_full_rank_reproduces_w_for_every_scaling():
    diag = torch.rand(40, generator=G) + 0.1
    tri = torch.linalg.cholesky(torch.cov(torch.randn(40, 200, generator=G)) + 0.1 * torch.eye(40))
    for scale in (None, diag, tri):
        u, v = factorize(W, rank=24, scale=scale)
        assert u.shape == (24, 24) and v.shape == (24, 40)
        torch.testing.assert_close(u @ v, W, rtol=0, atol=1e-5)


def test_truncated_svd_error_is_the_tail_of_the_spectrum():
    """Eckart–Young: ‖W − U_k V_k‖_F² = Σ_{i>k} σᵢ²."""
    s = torch.linalg.svdvals(W.double())
    for k in (1, 5, 12):
        u, v = factorize(W, rank=k)
        err = (W.double() - (u @ v).double()).square().sum()
        torch.testing.assert_close(err, s[k:].square().sum(), rtol=1e-5, atol=1e-6)


def test_energy_picks_the_smallest_rank():
    s2 = torch.linalg.svdvals(W.double()).square()
    frac = s2.cumsum(0) / s2.sum()
    for energy in (0.5, 0.9, 0.99, 1.0):
        u, _ = factorize(W, energy=energy)
        k = u.shape[1]
        assert frac[k - 1] >= energy - 1e-12 and (k == 1 or frac[k - 2] < energy)


def activation_error(method: str, rank: int) -> float:
    """‖X Wᵀ − X W'ᵀ‖_F on inputs whose channels differ in scale by 100x (outlier channels, as in LLMs)."""
    torch.manual_seed(0)
    linear = nn.Linear(40, 24, bias=False)
    x = torch.randn(512, 40) * torch.logspace(-1, 1, 40)  # (n, in)
    with observe({"l": linear}) as stats:
        linear(x)
    with torch.no_grad():
        new = lowrank_linear(linear, LowRankConfig(method=method, rank=rank, force=True, damp=0.0), stats["l"])
        return (linear(x) - new(x)).norm().item()


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_activation_aware_beats_plain_svd_on_outputs(rank):
    svd, asvd, svd_llm = (activation_error(m, rank) for m in ("svd", "asvd", "svd_llm"))
    assert asvd <= svd
    assert svd_llm <= asvd + 1e-6  # the whitened SVD is the optimum of this error (SVD-LLM's theorem)


def test_svd_llm_is_the_optimal_output_approximation():
    """With XᵀX = L Lᵀ, the output error equals the tail of the spectrum of W L."""
    torch.manual_seed(0)
    linear = nn.Linear(40, 24, bias=False)
    x = torch.randn(512, 40) * torch.logspace(-1, 1, 40)
    with observe({"l": linear}) as stats:
        linear(x)
    L = torch.linalg.cholesky(stats["l"].xtx)
    tail = torch.linalg.svdvals(linear.weight.detach().double() @ L)[8:].square().sum().sqrt()
    with torch.no_grad():
        new = lowrank_linear(linear, LowRankConfig(method="svd_llm", rank=8, damp=0.0), stats["l"])
        err = (linear(x) - new(x)).double().norm()
    torch.testing.assert_close(err, tail, rtol=1e-3, atol=1e-4)


def test_param_ratio_rank_and_layers_that_would_grow_stay_whole():
    linear = nn.Linear(40, 24)
    new = lowrank_linear(linear, LowRankConfig(param_ratio=0.5))
    assert isinstance(new, LowRankLinear) and new.rank == int(0.5 * 40 * 24 / 64)
    assert sum(p.numel() for p in new.parameters()) == new.rank * 64 + 24  # bias kept on u
    assert lowrank_linear(linear, LowRankConfig(rank=20)) is None  # 20·64 > 40·24
    assert lowrank_linear(linear, LowRankConfig(rank=20, force=True)).rank == 20


def test_decompose_full_rank_reproduces_the_model_and_saves_smaller(tmp_path):
    model, tok = load_model("tiny-llama")
    ref = model(X).logits
    decompose(model, None, LowRankConfig(rank=64, force=True))  # full rank: exact
    torch.testing.assert_close(model(X).logits, ref, rtol=0, atol=1e-4)
    small, _ = load_model("tiny-llama")
    n0 = sum(p.numel() for p in set(small.parameters()))
    decompose(small, None, LowRankConfig(param_ratio=0.5))
    names = [n for n, m in small.named_modules() if isinstance(m, LowRankLinear)]
    assert len(names) == 14  # 7 linears x 2 layers
    assert sum(p.numel() for p in set(small.parameters())) < n0
    logits = small(X).logits
    save_decomposed(small, tok, tmp_path / "m")
    loaded, _ = load_decomposed(tmp_path / "m")
    torch.testing.assert_close(loaded(X).logits, logits, rtol=0, atol=0)
    with pytest.raises(LlmlabError, match="already decomposed"):
        decompose(small, None, LowRankConfig(rank=4))


@pytest.mark.parametrize("method", ["asvd", "svd_llm"])
def test_calibrated_methods_on_a_tiny_model(method):
    model, _ = load_model("tiny-qwen2")
    ref = model(X).logits
    decompose(model, CALIB, LowRankConfig(method=method, param_ratio=0.6))
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 14
    assert torch.isfinite(model(X).logits).all() and not torch.equal(model(X).logits, ref)
    with pytest.raises(LlmlabError, match="reads activations"):
        decompose(load_model("tiny-qwen2")[0], None, LowRankConfig(method=method, rank=4))


def test_decomposed_factors_quantize_like_any_linear():
    model, _ = load_model("tiny-llama")
    decompose(model, None, LowRankConfig(param_ratio=0.5))
    ref = model(X).logits
    quantize_model(model, "rtn", None, bits=8, group_size=0, symmetric=True)
    names = quantized_linears(model)
    assert len(names) == 28 and all(n.endswith((".u", ".v")) for n in names)
    assert (model(X).logits - ref).abs().max() < 0.05


def test_lorc_at_full_rank_restores_the_float_model_and_shrinks_each_error():
    float_model, _ = load_model("tiny-llama")
    ref = float_model(X).logits
    full = add_lorc(quantize_model(copy.deepcopy(float_model), "rtn", None, bits=3, group_size=32), float_model, 64)
    torch.testing.assert_close(full(X).logits, ref, rtol=0, atol=1e-4)  # Ŵ + E = W exactly
    low = add_lorc(quantize_model(copy.deepcopy(float_model), "rtn", None, bits=3, group_size=32), float_model, 4)
    floats = dict(float_model.named_modules())
    layers = {n: m for n, m in low.named_modules() if isinstance(m, LoRCLinear)}
    assert len(layers) == 14
    for name, m in layers.items():
        w_hat = m.base_layer.dequantized_weight()
        before = (floats[name].weight - w_hat).norm()
        after = (floats[name].weight - w_hat - m.u.weight @ m.v.weight).norm()
        assert after < before  # the best rank-4 part of E removed (Eckart–Young)


def test_lorc_reduces_the_output_error_of_the_quantized_model():
    float_model, _ = load_model("tiny-llama")
    with torch.no_grad():
        ref = float_model(X).logits
        plain = quantize_model(copy.deepcopy(float_model), "rtn", None, bits=3, group_size=32)
        error = (plain(X).logits - ref).norm()
        corrected = add_lorc(plain, float_model, 8)
        assert (corrected(X).logits - ref).norm() < 0.95 * error  # random weights: E has no dominant directions


def _compressed(name="tiny-llama", rank=None, method="rtn", lorc=None):
    """A tiny model, decomposed at `rank`, quantized W4 g16 by `method`, then LoRC at rank `lorc` (optional steps)."""
    model, tok = load_model(name)
    if rank:
        decompose(model, None, LowRankConfig(rank=rank))
    reference = copy.deepcopy(model)
    quantize_model(model, method, CALIB if method == "gptq" else None, bits=4, group_size=16)
    return (add_lorc(model, reference, lorc) if lorc else model), tok


Q, C = "model.layers.0.self_attn.q_proj", "transformer.h.0.attn.c_attn"


@pytest.mark.parametrize("steps, kinds", [
    ({"rank": 16}, {Q: "lowrank", f"{Q}.u": "weight_only", f"{Q}.v": "weight_only"}),
    ({"rank": 16, "method": "gptq"}, {Q: "lowrank", f"{Q}.u": "weight_only", f"{Q}.v": "weight_only"}),
    ({"lorc": 4}, {Q: "lorc", f"{Q}.base_layer": "weight_only"}),
    ({"lorc": 4, "name": "tiny-gpt2"}, {C: "lorc", f"{C}.base_layer": "weight_only"}),  # Conv1D: W stored (in, out)
    ({"rank": 16, "lorc": 4}, {Q: "lowrank", f"{Q}.u": "lorc", f"{Q}.u.base_layer": "weight_only"}),
], ids=["svd+rtn", "svd+gptq", "rtn+lorc", "gpt2-rtn+lorc", "svd+rtn+lorc"])
def test_composed_models_reload_with_identical_logits(tmp_path, steps, kinds):
    model, tok = _compressed(**steps)
    with torch.no_grad():
        before = model(X).logits
    save_quantized(model, tok, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(X).logits, before)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    modules = json.loads((tmp_path / "m" / QUANT_MARKER).read_text())["modules"]
    assert {name: modules[name]["kind"] for name in kinds} == kinds


def test_a_plain_decomposed_folder_and_one_of_the_older_format_load(tmp_path):
    model, tok = load_model("tiny-llama")
    decompose(model, None, LowRankConfig(rank=16))
    with torch.no_grad():
        before = model(X).logits
    marker = json.loads((save_decomposed(model, tok, tmp_path / "new") / QUANT_MARKER).read_text())
    assert marker["method"] is None and marker["lowrank"] == "svd"
    assert marker["modules"]["model.layers.0.self_attn.q_proj"] == {"kind": "lowrank", "rank": 16}
    model.save_pretrained(tmp_path / "old")  # what save_decomposed wrote before
    tok.save_pretrained(tmp_path / "old")
    (tmp_path / "old" / MARKER).write_text(json.dumps({"format": 1, "method": "svd", "modules": {
        name: {"rank": m.rank, "in": m.in_features, "out": m.out_features}
        for name, m in model.named_modules() if isinstance(m, LowRankLinear)}}))
    for folder in ("new", "old"):
        loaded, _ = load_model(tmp_path / folder)
        with torch.no_grad():
            assert torch.equal(loaded(X).logits, before)
        assert loaded.llmlab_lowrank["method"] == "svd" and len(loaded.llmlab_lowrank["modules"]) == 14


class _NoDequantize(QuantizedLinear):
    kind = "opaque"

    def config(self):
        return {}


def test_lorc_refuses_what_it_cannot_correct():
    float_model, _ = load_model("tiny-llama")
    quantized = quantize_model(copy.deepcopy(float_model), "rtn", None, bits=4, group_size=32)
    with pytest.raises(LlmlabError, match="LoRC rank must be at least 1, got 0"):
        add_lorc(quantized, float_model, 0)
    with pytest.raises(LlmlabError, match="has none; quantize it first"):
        add_lorc(copy.deepcopy(float_model), float_model, 4)
    rescaled = copy.deepcopy(quantized)
    rescaled.model.layers[1].post_attention_layernorm.weight.data *= 2  # as AWQ/SmoothQuant fold their scales
    with pytest.raises(LlmlabError, match="post_attention_layernorm.weight differs from the reference"):
        add_lorc(rescaled, float_model, 4)
    opaque = copy.deepcopy(quantized)
    opaque.model.layers[0].mlp.up_proj = _NoDequantize(64, 256, False)
    with pytest.raises(LlmlabError, match="dequantized weight of model.layers.0.mlp.up_proj.*kind 'opaque'"):
        add_lorc(opaque, float_model, 4)
    add_lorc(quantized, float_model, 4)
    with pytest.raises(LlmlabError, match="already has LoRC"):
        add_lorc(quantized, float_model, 4)
    assert not any(isinstance(m, LoRCLinear) for m in rescaled.modules())  # nothing changed where refused


def test_decompose_verb_writes_a_run(tmp_path):
    from llmlab.runs import RunOptions

    text = tmp_path / "c.txt"
    text.write_text("some calibration text, repeated. " * 200)
    cfg = DecomposeConfig(model="tiny-llama", method="asvd", param_ratio=0.5, calib=str(text), n_samples=2, seq_len=32)
    summary = decompose_verb(cfg, RunOptions(out=str(tmp_path / "run")))
    assert summary["layers"] == 14 and summary["params_after"] < summary["params_before"]
    model, _ = load_decomposed(tmp_path / "run" / "model")
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 14


@pytest.mark.parametrize("options, match", [
    ({}, "exactly one of"), ({"rank": 4, "energy": 0.9}, "exactly one of"), ({"rank": 0}, "rank must be"),
    ({"param_ratio": 1.0}, "param_ratio must be"), ({"energy": 0.0}, "energy must be"),
    ({"method": "tucker", "rank": 4}, "must be one of"), ({"rank": 4, "skip": ["("]}, "not a valid regex"),
])
def test_bad_config(options, match):
    with pytest.raises(LlmlabError, match=match) as e:
        LowRankConfig(**options)
    assert "\n" not in str(e.value)
    with pytest.raises(LlmlabError, match="give --calib"):
        DecomposeConfig(method="asvd", rank=4)

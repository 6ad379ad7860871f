"""SparseGPT: the blocked solver equals a plain one-column-at-a-time OBS re-derivation, and beats magnitude."""

import math
from copy import deepcopy

import pytest
import torch

from llmlab.compress.sparsegpt import SparseGPTConfig, prune_sparsegpt, sparsegpt
from llmlab.compress.sparsity import PruneSpec, mask_for, sparsity_report
from llmlab.compress.wanda import wanda_score
from llmlab.errors import LlmlabError


def correlated_inputs(n=512, d=64, seed=0):
    """X (n, d) with correlated features of varied scale and one dead (always-zero) feature."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / math.sqrt(d) + torch.eye(d)
    X = (torch.randn(n, d, generator=gen) @ mix) * torch.logspace(-0.5, 0.5, d)
    X[:, 5] = 0
    return X


def hessian(X):
    return 2 / X.shape[0] * X.T @ X


def plain_sparsegpt(W, H, sparsity, nm, damp, mask_block, fixed=None):
    """Algorithm 1 of the paper from its definitions, in float64, one column at a time: the full
    inverse Hessian of the not-yet-visited columns F (no Cholesky, no lazy blocks), downdated by
    Gaussian elimination after each column; every `step` columns, the mask of the next `step`
    columns is chosen on the current weights by the OBS saliency w² / [H_{F_k}⁻¹]_kk, the inverse
    Hessian entry column k will have when the loop reaches it. `fixed`: a given mask instead."""
    W, H = W.double().clone(), H.double().clone()
    n_in = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(n_in, dtype=H.dtype)
    at_visit = torch.stack([torch.linalg.inv(H[k:, k:])[0, 0] for k in range(n_in)])  # [H_{F_k}⁻¹]_kk
    Hinv = torch.linalg.inv(H)
    step = nm[1] if nm else (mask_block or n_in)
    keep = torch.ones(W.shape, dtype=torch.bool) if fixed is None else fixed
    for j in range(n_in):
        if fixed is None and j % step == 0:
            saliency = W[:, j:j + step] ** 2 / at_visit[j:j + step]
            if nm:
                idx = saliency.view(W.shape[0], -1, nm[1]).topk(nm[0], dim=-1).indices
                keep[:, j:j + step] = torch.zeros_like(saliency, dtype=torch.bool).view(
                    W.shape[0], -1, nm[1]).scatter_(-1, idx, True).view(W.shape[0], -1)
            else:
                k = math.floor(saliency.numel() * sparsity + 1e-6)
                flat = torch.ones(saliency.numel(), dtype=torch.bool)
                flat[saliency.flatten().argsort()[:k]] = False
                keep[:, j:j + step] = flat.view(saliency.shape)
        q = W[:, j] * keep[:, j]
        d = Hinv[j, j]
        W[:, j:] -= ((W[:, j] - q) / d)[:, None] * Hinv[j, j:][None, :]  # the OBS update of F = {j, j+1, …}
        W[:, j] = q
        Hinv -= Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / d  # remove j from F
    return W.float()


@pytest.mark.parametrize("sparsity,pattern,block_size,mask_block", [
    (0.5, "", 16, 16),     # the reference's setting: lazy block = mask block
    (0.5, "", 24, 16),     # mask blocks straddling lazy blocks: chosen on pending-updated weights
    (0.5, "", 8, 32),
    (0.3, "", 64, 0),      # one mask for the whole layer, chosen up front
    (0.7, "", 20, 12),
    (None, "2:4", 16, 16),
    (None, "2:4", 7, 16),  # N:M groups straddling lazy blocks
    (None, "4:8", 24, 16),
    (None, "1:4", 32, 16),
])
def test_blocked_sparsegpt_equals_plain_one_column_at_a_time(sparsity, pattern, block_size, mask_block):
    X, W = correlated_inputs(), torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    spec = PruneSpec(sparsity, pattern)
    w_hat = sparsegpt(W, hessian(X), spec, damp=0.01, block_size=block_size, mask_block=mask_block)
    ref = plain_sparsegpt(W, hessian(X), spec.ratio, spec.nm if pattern else None, 0.01, mask_block)
    assert torch.equal(w_hat == 0, ref == 0)  # the same mask
    assert (w_hat - ref).abs().max() < 1e-4
    assert (w_hat[:, 5] == 0).all()  # the dead column
    if pattern:
        n, m = spec.nm
        assert ((w_hat != 0).view(24, 64 // m, m).sum(-1) <= n).all()
    else:
        widths = [min(mask_block or 64, 64 - j) for j in range(0, 64, mask_block or 64)]
        assert (w_hat == 0).sum() == sum(math.floor(spec.ratio * 24 * w + 1e-6) for w in widths)  # exact, per block


def test_block_size_does_not_change_the_result():
    X, W = correlated_inputs(seed=1), torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    for spec in (PruneSpec(0.5), PruneSpec(None, "2:4")):
        results = [sparsegpt(W, hessian(X), spec, block_size=b, mask_block=32) for b in (1, 7, 32, 128)]
        for r in results[1:]:
            assert (r - results[0]).abs().max() < 1e-4


@pytest.mark.parametrize("spec", [PruneSpec(0.5), PruneSpec(None, "2:4")])
def test_a_given_wanda_mask_is_kept_and_the_update_only_lowers_the_error(spec):
    X, W = low_rank_inputs(), torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    X[:, 5] = 0  # a dead input: its column goes, whatever the mask says
    keep = mask_for(wanda_score(W, X.square().sum(0)), spec)
    w_hat = sparsegpt(W, hessian(X), spec, block_size=16, mask=keep)
    ref = plain_sparsegpt(W, hessian(X), spec.ratio, None, 0.01, 0, fixed=keep.clone())
    assert (w_hat - ref).abs().max() < 1e-4
    keep[:, 5] = False
    assert torch.equal(w_hat != 0, keep)
    err = lambda w: torch.linalg.norm(X @ W.T - X @ w.T).item()  # noqa: E731
    assert err(w_hat) < 0.8 * err(W * keep)


def test_wanda_mask_option_prunes_the_first_layer_as_wanda_does(tiny_llama):
    from llmlab.compress.calibrate import calibration_data
    from llmlab.compress.wanda import WandaConfig, prune_wanda

    tok = tiny_llama[1]
    calib = calibration_data(tok, "The quick brown fox jumps over the lazy dog. " * 60, n_samples=4, seq_len=64)
    wanda, updated = deepcopy(tiny_llama[0]), deepcopy(tiny_llama[0])
    prune_wanda(wanda, calib, WandaConfig(pattern="2:4"))
    prune_sparsegpt(updated, calib, SparseGPTConfig(pattern="2:4", mask="wanda"))
    first = [(name, m.weight) for name, m in updated.model.layers[0].named_modules() if hasattr(m, "weight")
             and m.weight.ndim == 2]
    for name, w in first:  # the same inputs reach layer 0, so the same mask; the kept weights moved
        w_wanda = wanda.model.layers[0].get_submodule(name).weight
        assert torch.equal(w == 0, w_wanda == 0), name
    assert any(not torch.equal(w, wanda.model.layers[0].get_submodule(n).weight) for n, w in first)


def low_rank_inputs(n=1024, d=64, seed=2, noise=0.3):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, d // 4, generator=gen) @ torch.randn(d // 4, d, generator=gen)
    return latent + noise * torch.randn(n, d, generator=gen)


@pytest.mark.parametrize("spec", [PruneSpec(0.5), PruneSpec(0.3), PruneSpec(None, "2:4"), PruneSpec(None, "4:8")])
def test_reconstruction_error_beats_magnitude_and_wanda(spec):
    X, W = low_rank_inputs(), torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    err = {name: torch.linalg.norm(X @ W.T - X @ w.T).item() for name, w in [
        ("sparsegpt", sparsegpt(W, hessian(X), spec)),
        ("magnitude", W * mask_for(W.abs(), spec)),
        ("wanda", W * mask_for(wanda_score(W, X.square().sum(0)), spec))]}
    assert err["sparsegpt"] <= err["magnitude"] and err["sparsegpt"] <= err["wanda"], err
    assert err["sparsegpt"] < 0.6 * err["magnitude"], err  # measured: 0.29-0.43


@pytest.mark.parametrize("spec_name", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_end_to_end_and_the_saved_folder_loads(spec_name, tmp_path):
    from llmlab.compress.calibrate import calibration_data
    from llmlab.evaluate.perplexity import perplexity
    from llmlab.models import load_model, save_model

    model, tok = load_model(spec_name)
    text = "The quick brown fox jumps over the lazy dog. " * 60
    calib = calibration_data(tok, text, n_samples=8, seq_len=64)
    prune_sparsegpt(model, calib, SparseGPTConfig(pattern="2:4", block_size=32))
    report = sparsity_report(model)
    assert report["min"] >= 0.5 and report["max"] < 0.52  # 2:4, plus the odd dead input column
    ppl = perplexity(model, tok, text, seq_len=128, max_windows=2, progress=False)["ppl"]
    loaded, _ = load_model(save_model(model, tok, tmp_path / "m"))
    assert perplexity(loaded, tok, text, seq_len=128, max_windows=2, progress=False)["ppl"] == pytest.approx(ppl)
    assert sparsity_report(loaded) == report


def test_tiny_llama_skip_and_unstructured(tiny_llama):
    from llmlab.compress.calibrate import calibration_data

    model, tok = deepcopy(tiny_llama[0]), tiny_llama[1]
    down1 = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    calib = calibration_data(tok, "The quick brown fox jumps over the lazy dog. " * 60, n_samples=4, seq_len=64)
    prune_sparsegpt(model, calib, SparseGPTConfig(sparsity=0.6, skip=[r"layers\.1\.mlp\.down"]))
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, down1)
    report = sparsity_report(model, skip=[r"layers\.1\.mlp\.down"])
    assert 0.599 <= report["min"] and report["max"] < 0.62  # ⌊0.6 · 64 · 64⌋ / 4096 = 0.5998 per block


def test_bad_input(tiny_llama):
    with pytest.raises(LlmlabError, match="damp must be in"):
        SparseGPTConfig(damp=0)
    with pytest.raises(LlmlabError, match="block_size must be a positive integer"):
        SparseGPTConfig(block_size=0)
    with pytest.raises(LlmlabError, match="mask must be one of obs, wanda"):
        SparseGPTConfig(mask="magnitude")
    with pytest.raises(LlmlabError, match="mask_block must be >= 0"):
        SparseGPTConfig(mask_block=-1)
    with pytest.raises(LlmlabError, match=r"sparsity must be in \[0, 1\), got 1.5"):
        SparseGPTConfig(sparsity=1.5)
    with pytest.raises(LlmlabError, match="needs calibration text"):
        prune_sparsegpt(tiny_llama[0], None)
    with pytest.raises(LlmlabError, match="M=5 does not divide"):
        prune_sparsegpt(tiny_llama[0], torch.zeros(2, 8, dtype=torch.long), SparseGPTConfig(pattern="2:5"))

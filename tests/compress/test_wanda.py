"""Wanda: masks equal a direct computation of |W_ij|·‖X_j‖₂ compared within each output row."""

from copy import deepcopy

import pytest
import torch
from torch import nn

from llmlab.compress.calibrate import calibration_data
from llmlab.compress.sparsity import PruneSpec, mask_for, sparsity_report
from llmlab.compress.wanda import WandaConfig, prune_wanda, wanda_score
from llmlab.errors import LlmlabError

TEXT = "The quick brown fox jumps over the lazy dog. A cat sat on the warm mat by the door. " * 40


def definition_mask(W: torch.Tensor, X: torch.Tensor, sparsity: float = 0.5, nm=None) -> torch.Tensor:
    """keep (out, in) straight from the paper, in float64 with loops: S_ij = |W_ij| · sqrt(Σ_n X_nj²);
    in each output row (or each run of M weights of it) the lowest-scoring weights are dropped."""
    W, X = W.double(), X.reshape(-1, X.shape[-1]).double()
    norms = torch.tensor([torch.sqrt((X[:, j] ** 2).sum()).item() for j in range(X.shape[1])], dtype=torch.float64)
    keep = torch.ones(W.shape, dtype=torch.bool)
    for i in range(W.shape[0]):
        S = [abs(W[i, j].item()) * norms[j].item() for j in range(W.shape[1])]
        if nm is None:
            groups, drop = [list(range(W.shape[1]))], int(sparsity * W.shape[1])
        else:
            n, m = nm
            groups, drop = [list(range(g, g + m)) for g in range(0, W.shape[1], m)], m - n
        for cols in groups:
            for j in sorted(cols, key=lambda j: S[j])[:drop]:
                keep[i, j] = False
    return keep


def test_toy_layer_mask_matches_the_definition():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(12, 32, generator=gen)
    X = torch.randn(3, 50, 32, generator=gen) * torch.logspace(-1, 1, 32)  # features of very different scale
    sq_sum = X.reshape(-1, 32).double().square().sum(0)
    for spec, nm in [(PruneSpec(0.5), None), (PruneSpec(0.3), None), (PruneSpec(None, "2:4"), (2, 4)),
                     (PruneSpec(None, "4:8"), (4, 8))]:
        keep = mask_for(wanda_score(W, sq_sum), spec)
        assert torch.equal(keep, definition_mask(W, X, spec.ratio, nm)), spec
    # the activations matter: magnitude alone would choose differently
    assert not torch.equal(mask_for(wanda_score(W, sq_sum), PruneSpec(0.5)), mask_for(W.abs(), PruneSpec(0.5)))


@pytest.mark.parametrize("pattern,nm", [("", None), ("2:4", (2, 4))])
def test_tiny_llama_masks_match_the_definition_layer_by_layer(tiny_llama, pattern, nm):
    """Re-derive every mask: run the model with the layers before ℓ already pruned to the expected
    masks, take each linear's inputs in layer ℓ, apply the definition."""
    model, tok = deepcopy(tiny_llama[0]), tiny_llama[1]
    reference = deepcopy(model)
    calib = calibration_data(tok, TEXT, n_samples=4, seq_len=48)
    prune_wanda(model, calib, WandaConfig(pattern=pattern, batch_size=3))
    for layer, ref_layer in zip(model.model.layers, reference.model.layers):
        linears = {n: m for n, m in ref_layer.named_modules() if isinstance(m, nn.Linear)}
        inputs = {n: [] for n in linears}
        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs[n].append(args[0]))
                 for n, m in linears.items()]
        with torch.no_grad():
            reference(input_ids=calib, use_cache=False)
        for h in hooks:
            h.remove()
        for name, linear in linears.items():
            keep = definition_mask(linear.weight, torch.cat(inputs[name]), 0.5, nm)
            with torch.no_grad():
                linear.weight.mul_(keep)  # the reference model's layer ℓ is now pruned as the definition says
            assert torch.equal(layer.get_submodule(name).weight, linear.weight), name
    assert sparsity_report(model)["min"] == sparsity_report(model)["max"] == 0.5


def test_bad_input(tiny_llama):
    with pytest.raises(LlmlabError, match="needs calibration text"):
        prune_wanda(tiny_llama[0], None, WandaConfig())
    with pytest.raises(LlmlabError, match="batch_size must be a positive integer"):
        WandaConfig(batch_size=0)
    with pytest.raises(LlmlabError, match="not a valid regex"):
        WandaConfig(skip=["("])
    with pytest.raises(LlmlabError, match="M=6 does not divide the in_features=64"):
        prune_wanda(tiny_llama[0], torch.zeros(2, 8, dtype=torch.long), WandaConfig(pattern="3:6"))


@pytest.mark.slow
def test_builtin_model_wanda_beats_magnitude_at_half_sparsity(builtin_model):
    from llmlab.compress.magnitude import MagnitudeConfig, prune_magnitude
    from llmlab.evaluate.perplexity import perplexity
    from tests.conftest import WIKITEXT

    model, tok = builtin_model
    text = WIKITEXT.read_text(encoding="utf-8")
    calib = calibration_data(tok, text[:300_000], n_samples=8, seq_len=256)  # calibrate and evaluate on
    evaluation = text[600_000:700_000]                                       # different text
    ppl = {}
    for name, pruned in [("magnitude", lambda m: prune_magnitude(m, None, MagnitudeConfig())),
                         ("wanda", lambda m: prune_wanda(m, calib, WandaConfig()))]:
        ppl[name] = perplexity(pruned(deepcopy(model)), tok, evaluation, seq_len=1024, max_windows=2,
                               progress=False)["ppl"]
    assert ppl["wanda"] < 0.5 * ppl["magnitude"], ppl

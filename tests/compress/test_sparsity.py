"""Masks shared by the pruning methods: exact counts, the N:M convention, the checks."""

import pytest
import torch

from llmlab.compress.sparsity import (PruneSpec, check_model, matrix_mask, n_pruned, nm_mask, prune_targets, row_mask,
                                      sparsity_report)
from llmlab.errors import LlmlabError


def test_row_mask_drops_the_lowest_of_each_row():
    score = torch.tensor([[4., 1., 3., 2.], [0.5, 0.7, 0.1, 0.9], [1., 2., 3., 4.]])
    keep = row_mask(score, 0.5)
    assert keep.tolist() == [[True, False, True, False], [False, True, False, True], [False, False, True, True]]
    assert row_mask(score, 0.0).all() and row_mask(score, 0.74).sum(1).tolist() == [2, 2, 2]  # ⌊0.74·4⌋ = 2 dropped


def test_matrix_mask_has_one_threshold():
    score = torch.tensor([[4., 1., 3., 2.], [0.5, 0.7, 0.1, 0.9]])
    keep = matrix_mask(score, 0.5)
    assert keep.tolist() == [[True, True, True, True], [False, False, False, False]]


def test_n_pruned_is_exact_floor():
    assert [n_pruned(100, p) for p in (0.29, 0.3, 0.5, 0.7, 0.999)] == [29, 30, 50, 70, 99]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_keeps_exactly_n_of_every_m(n, m):
    score = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    keep = nm_mask(score, n, m)
    groups = keep.view(16, 64 // m, m)
    assert (groups.sum(-1) == n).all()  # N nonzeros kept, M − N zeros, in each group
    # the kept ones are the group's largest scores
    s = score.view(16, 64 // m, m)
    assert (s.masked_fill(~groups, float("inf")).amin(-1) >= s.masked_fill(groups, -1).amax(-1)).all()
    assert PruneSpec(None, f"{n}:{m}").ratio == pytest.approx(1 - n / m)


def test_spec_defaults_and_agreement():
    assert PruneSpec().ratio == 0.5 and PruneSpec(0.3).ratio == 0.3 and PruneSpec(0, "").ratio == 0
    assert PruneSpec(0.5, "2:4").nm == (2, 4) and PruneSpec(None, " 4 : 8 ").nm == (4, 8)
    assert PruneSpec(None, "2:4").describe() == "2:4 (50%)" and PruneSpec(0.25).describe() == "25% unstructured"


@pytest.mark.parametrize("sparsity,pattern,message", [
    (1.0, "", "sparsity must be in [0, 1), got 1.0"),
    (-0.1, "", "sparsity must be in [0, 1), got -0.1"),
    (None, "2-4", "pattern must be 'N:M' with 1 <= N <= M"),
    (None, "5:4", "pattern must be 'N:M' with 1 <= N <= M"),
    (None, "0:4", "pattern must be 'N:M'"),
    (0.6, "2:4", "pattern 2:4 keeps 2 of every 4 weights, sparsity 0.5, not 0.6"),
])
def test_spec_bad_input(sparsity, pattern, message):
    with pytest.raises(LlmlabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PruneSpec(sparsity, pattern)


def test_check_model(tiny_llama):
    model = tiny_llama[0]
    assert len(prune_targets(model, [])) == 14
    assert len(prune_targets(model, [r"mlp\.down"])) == 12
    check_model(model, PruneSpec(None, "4:8"), [])
    with pytest.raises(LlmlabError, match="pattern 2:3: M=3 does not divide the in_features=64 of "
                                          "model.layers.0.self_attn.q_proj"):
        check_model(model, PruneSpec(None, "2:3"), [])
    with pytest.raises(LlmlabError, match="no linear layer left to prune"):
        check_model(model, PruneSpec(), ["."])


def test_check_model_refuses_a_quantized_model():
    from llmlab.compress.rtn import RTNConfig, quantize_rtn
    from llmlab.models import load_model

    model, _ = load_model("tiny-llama")
    quantize_rtn(model, None, RTNConfig(group_size=32))
    with pytest.raises(LlmlabError, match="model.layers.0.self_attn.q_proj is quantized; prune the float model first"):
        check_model(model, PruneSpec(), [])


def test_sparsity_report(tiny_llama):
    from copy import deepcopy

    model = deepcopy(tiny_llama[0])
    q = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q[:, :16] = 0
    report = sparsity_report(model)
    assert report["per_layer"]["model.layers.0.self_attn.q_proj"] == 0.25
    assert report["min"] == 0 and report["max"] == 0.25 and report["zero_weights"] == 64 * 16
    assert report["overall"] == 64 * 16 / report["pruned_layer_weights"]

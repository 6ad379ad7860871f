"""Magnitude pruning: the masks from the definition, on LLaMA and GPT-2 (Conv1D) layers."""

from copy import deepcopy

import pytest
import torch

from llmlab.compress.magnitude import MagnitudeConfig, prune_magnitude
from llmlab.compress.sparsity import sparsity_report
from llmlab.errors import LlmlabError


def test_rows_lose_their_smallest_weights(tiny_llama):
    model = deepcopy(tiny_llama[0])
    W = model.model.layers[1].mlp.down_proj.weight.detach().clone()  # (64, 128)
    prune_magnitude(model, None, MagnitudeConfig(sparsity=0.25))
    pruned = model.model.layers[1].mlp.down_proj.weight
    for row, new in zip(W, pruned):  # each row: its 32 smallest |w| are zero, the rest untouched
        drop = row.abs().argsort()[:32]
        expected = row.clone()
        expected[drop] = 0
        assert torch.equal(new, expected)
    report = sparsity_report(model)
    assert report["min"] == report["max"] == 0.25


def test_layer_scope_uses_one_threshold(tiny_llama):
    model = deepcopy(tiny_llama[0])
    W = model.model.layers[0].self_attn.k_proj.weight.detach().clone()  # (32, 64)
    prune_magnitude(model, None, MagnitudeConfig(sparsity=0.5, scope="layer"))
    threshold = W.abs().flatten().sort().values[1023]
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, W * (W.abs() > threshold))


def test_nm_pattern_and_skip(tiny_llama):
    model = deepcopy(tiny_llama[0])
    down0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    prune_magnitude(model, None, MagnitudeConfig(pattern="2:4", skip=[r"layers\.0\.mlp\.down"]))
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down0)
    W = model.model.layers[1].self_attn.q_proj.weight.view(64, 16, 4)
    assert ((W != 0).sum(-1) == 2).all()


def test_gpt2_conv1d_is_pruned_along_its_input_dimension():
    from llmlab.models import load_model

    model, _ = load_model("tiny-gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (in 64, out 256)
    W = c_fc.weight.detach().clone()
    prune_magnitude(model, None, MagnitudeConfig(pattern="4:8"))
    assert type(c_fc).__name__ == "Conv1D" and model.transformer.h[0].mlp.c_fc is c_fc  # not swapped
    kept = (c_fc.weight != 0).T.reshape(256, 8, 8)  # (out, in/8, 8)
    assert (kept.sum(-1) == 4).all()
    assert torch.equal(c_fc.weight[c_fc.weight != 0], W[c_fc.weight != 0])


def test_bad_input(tiny_llama):
    with pytest.raises(LlmlabError, match="magnitude scope must be 'row' or 'layer'"):
        MagnitudeConfig(scope="global")
    with pytest.raises(LlmlabError, match="scope 'layer' is for unstructured pruning"):
        MagnitudeConfig(pattern="2:4", scope="layer")
    with pytest.raises(LlmlabError, match=r"sparsity must be in \[0, 1\)"):
        MagnitudeConfig(sparsity=1)
    model = tiny_llama[0]
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(LlmlabError, match="M=3 does not divide"):
        prune_magnitude(model, None, MagnitudeConfig(pattern="1:3"))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)  # nothing changed

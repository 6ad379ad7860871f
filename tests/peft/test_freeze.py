import pytest
import torch

from llmlab.errors import LlmlabError
from llmlab.peft import FreezeConfig, apply_freeze, apply_full, apply_method, save_adapter, trainable_parameters
from tests.peft.oracle import IDS, fresh

# one tiny-llama decoder layer: q 64·64, k and v 64·32, o 64·64, gate/up/down 64·128, two RMSNorms of 64
LAYER = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
EMBED = 320 * 64  # the byte-level vocabulary; tied with lm_head


def trained(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_default_trains_the_last_two_layers():
    model = apply_freeze(fresh())
    assert trainable_parameters(model) == (2 * LAYER, 2 * LAYER + EMBED + 64)
    assert {n.split(".")[2] for n in trained(model)} == {"0", "1"}  # tiny-llama has 2 layers


@pytest.mark.parametrize("layers", [[1], [-1]])
def test_one_layer_by_positive_or_negative_index(layers):
    model = apply_freeze(fresh(), FreezeConfig(layers=layers))
    assert trainable_parameters(model)[0] == LAYER
    assert all(n.startswith("model.layers.1.") for n in trained(model))


def test_extra_modules_by_name():
    model = apply_method(fresh(), "freeze", {"layers": [0], "modules": ["lm_head", "mlp"]})
    # layer 0 whole, layer 1's MLP, and the embedding matrix shared with lm_head (counted once)
    assert trainable_parameters(model)[0] == LAYER + 3 * 64 * 128 + EMBED
    assert "model.embed_tokens.weight" in trained(model)
    assert not any(n.startswith("model.layers.1.self_attn") for n in trained(model))


def test_gpt2_layers_are_found_too():
    model = apply_freeze(fresh("tiny-gpt2"), FreezeConfig(layers=[-1]))
    assert trained(model) and all(n.startswith("transformer.h.1.") for n in trained(model))
    assert trainable_parameters(model)[0] == sum(p.numel() for p in model.transformer.h[1].parameters())


def test_full_trains_everything_and_steps_change_only_chosen_layers():
    model = apply_full(apply_freeze(fresh()))
    assert trainable_parameters(model)[0] == trainable_parameters(model)[1]
    model = apply_freeze(fresh(), FreezeConfig(layers=[-1]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained(model)


def test_bad_input(tmp_path):
    with pytest.raises(LlmlabError, match=r"freeze layer index 2 is out of range: .* 2 decoder layers, so use -2..1"):
        apply_freeze(fresh(), FreezeConfig(layers=[2]))
    with pytest.raises(LlmlabError, match=r"index -3 is out of range"):
        apply_freeze(fresh(), FreezeConfig(layers=[-3]))
    with pytest.raises(LlmlabError, match="freeze would train nothing"):
        FreezeConfig(layers=[])
    with pytest.raises(LlmlabError, match=r"'lmhead' matches no module.*did you mean 'lm_head'"):
        apply_freeze(fresh(), FreezeConfig(modules=["lmhead"]))
    with pytest.raises(LlmlabError, match=r"unknown key 'freeze.layer'"):
        apply_method(fresh(), "freeze", {"layer": [1]})
    with pytest.raises(LlmlabError, match="no adapter to save.*llmlab.models.save_model"):
        save_adapter(apply_freeze(fresh()), tmp_path / "a")

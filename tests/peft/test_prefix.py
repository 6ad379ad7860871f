import pytest
import torch
from transformers import DynamicCache

from llmlab.errors import LlmlabError
from llmlab.peft import (PrefixConfig, PTuningV2Config, adapter_names, apply_method, apply_prefix, apply_ptuning2,
                         delete_adapter, disabled, load_adapter, save_adapter, set_adapter)
from llmlab.peft.base import adapter_method
from llmlab.peft.inputs import SoftPrompt
from llmlab.peft.prefix import PrefixEncoder
from tests.peft.oracle import (IDS, fresh, hf_generate, lively, llmlab_generate, logits, peft_logits, peft_save,
                               randomize, stepwise_greedy)


def test_prefix_mlp_is_the_reparameterisation():
    model = apply_prefix(fresh(), PrefixConfig(virtual_tokens=3, encoder_hidden=5))
    encoder = model.prefix_adapters.adapters["default"]
    assert isinstance(encoder, PrefixEncoder)
    first, last = encoder.mlp[0], encoder.mlp[2]
    expected = torch.tanh(encoder.embedding @ first.weight.T + first.bias) @ last.weight.T + last.bias
    torch.testing.assert_close(encoder(), expected, rtol=0, atol=1e-6)
    assert encoder().shape == (3, 2 * 2 * 32)  # tiny-llama: 2 layers × (keys, values) × 2 kv heads × 16


def test_prefix_is_a_kv_cache_ahead_of_the_sequence():
    """Re-derive the adapted model: the base model with layer l's keys and values prepended by hand."""
    n, (B, T) = 3, IDS.shape
    model = apply_ptuning2(fresh(), PTuningV2Config(virtual_tokens=n))
    randomize(model)
    P = model.ptuning2_adapters.adapters["default"].weight  # (n, L·2·32)
    def split(x):  # (n, 2 kv heads · 16) -> (B, 2, n, 16)
        return x.view(n, 2, 16).transpose(0, 1).expand(B, 2, n, 16)

    # layer l: keys, then values, each 2 kv heads × 16 wide
    heads = [(split(P[:, 64 * i:64 * i + 32]), split(P[:, 64 * i + 32:64 * i + 64])) for i in range(2)]
    with disabled(model), torch.no_grad():
        expected = model(input_ids=IDS, cache=DynamicCache(heads), attention_mask=torch.ones(B, n + T),
                         position_ids=torch.arange(n, n + T).expand(B, T)).logits
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", ["prefix", "ptuning2"])
def test_llmlab_prefix_loads_in_peft(tmp_path, spec, method):
    model = apply_method(fresh(spec), method, {"virtual_tokens": 4})
    randomize(model)
    save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(peft_logits(tmp_path / "a", spec), logits(model), rtol=0, atol=1e-5)
    back = load_adapter(fresh(spec), tmp_path / "a")
    assert adapter_method(back, "default") == method
    assert isinstance(back.prefix_adapters.adapters["default"] if method == "prefix"
                      else back.ptuning2_adapters.adapters["default"], SoftPrompt)  # only the derived prefix
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("projection", [True, False])
def test_peft_prefix_loads_in_llmlab(tmp_path, spec, projection):
    from peft import PrefixTuningConfig

    expected = peft_save(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection,
                                            encoder_hidden_size=7), tmp_path / "p", spec)
    model = load_adapter(fresh(spec), tmp_path / "p")
    assert adapter_method(model, "default") == ("prefix" if projection else "ptuning2")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_generation_matches_peft(tmp_path, spec):
    from peft import PeftModel

    model = apply_prefix(lively(fresh(spec)), PrefixConfig(virtual_tokens=3))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    theirs = PeftModel.from_pretrained(lively(fresh(spec)), str(tmp_path / "a")).eval()
    prompts = [[5, 17, 99, 3, 40, 41], [8, 9]]
    # peft's own forward, token by token: peft 0.21's generate loses the prefix under transformers
    # 5.25, which passes the cache as `cache` and ignores peft's `past_key_values`
    alone = [stepwise_greedy(theirs, p, 8) for p in prompts]
    assert llmlab_generate(model, prompts[:1], 8) == alone[:1]
    ours = llmlab_generate(model, prompts, 8)  # a left-padded batch gives each row what it gives alone
    assert ours == alone == hf_generate(model, prompts, 8)  # transformers' generate on llmlab's prefix too
    assert len(set(map(tuple, ours))) == 2 and all(len(set(row)) > 2 for row in ours)  # not a degenerate repeat


def test_switch_disable_delete():
    base = logits(fresh())
    model = apply_prefix(fresh(), PrefixConfig(virtual_tokens=2), name="a")
    apply_ptuning2(model, PTuningV2Config(virtual_tokens=3), name="b")
    randomize(model)
    set_adapter(model, "a")
    out_a = logits(model)
    set_adapter(model, "b")
    assert not torch.allclose(logits(model), out_a)
    with disabled(model):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    delete_adapter(model, "b")
    assert not hasattr(model, "ptuning2_adapters") and adapter_names(model) == ["a"]
    set_adapter(model, "a")
    torch.testing.assert_close(logits(model), out_a, rtol=0, atol=0)
    delete_adapter(model, "a")
    assert not model._forward_pre_hooks and not model._forward_hooks  # the hooks went with the module
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


def test_training_reaches_the_mlp():
    torch.manual_seed(0)
    model = apply_prefix(fresh(), PrefixConfig(virtual_tokens=4)).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * 32 + (32 * 32 + 32) + (32 * 128 + 128)  # P', MLP
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        assert model.prefix_adapters.adapters["default"].mlp[0].weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_refusals():
    with pytest.raises(LlmlabError, match="virtual_tokens must be at least 1"):
        PrefixConfig(virtual_tokens=0)
    with pytest.raises(LlmlabError, match="unknown key 'ptuning2.projection'"):
        apply_method(fresh(), "ptuning2", {"projection": True})
    model = apply_prefix(fresh(), PrefixConfig(virtual_tokens=2)).train()
    model.gradient_checkpointing_enable()
    with pytest.raises(LlmlabError, match="gradient checkpointing"):
        model(input_ids=IDS)
    with pytest.raises(LlmlabError, match="already exists"):
        apply_ptuning2(model, name="default")

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import LlmlabError
from llmlab.peft import (AdapterConfig, LoraConfig, adapter_names, apply_adapter, apply_lora, apply_method,
                         delete_adapter, disabled, load_adapter, merge, save_adapter, set_adapter, trainable_parameters)
from llmlab.peft.adapter import AdapterLinear
from llmlab.peft.base import adapter_modules
from tests.peft.oracle import IDS, fresh, logits, randomize


class Block(nn.Module):
    """A feed-forward sublayer: the parallel adapter reads its input x, the series one fc2's output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def toy(placement: str, **options):
    torch.manual_seed(0)
    model = nn.Sequential(Block())
    base = copy.deepcopy(model[0])
    apply_adapter(model, AdapterConfig(size=3, placement=placement, targets=["fc2"], **options))
    return model, base, model[0].fc2.adapters["default"]


@pytest.mark.parametrize("placement", ["series", "parallel"])
def test_zero_up_projection_starts_from_the_base_model(placement):
    model, base, _ = toy(placement, activation="gelu")
    x = torch.randn(4, 6)
    assert torch.equal(model(x), base(x))


def test_series_adapter_is_houlsby_equation():
    model, base, a = toy("series", activation="tanh")
    nn.init.normal_(a.up.weight)
    nn.init.normal_(a.up.bias)
    x = torch.randn(4, 6)
    y = base(x)
    expected = y + torch.tanh(y @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


def test_parallel_adapter_is_he_et_al_equation():
    model, base, a = toy("parallel", activation="silu", scaling=4.0)
    nn.init.normal_(a.up.weight)
    nn.init.normal_(a.up.bias)
    x = torch.randn(4, 6)
    # the bottleneck reads the block's input x (dim 6), not fc2's input (dim 10)
    expected = base(x) + 4.0 * (F.silu(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


def hooked_oracle(adapted: nn.Module, spec: str, placement: str, scaling: float = 1.0) -> nn.Module:
    """The base model with each adapter re-derived as a plain forward hook where the paper puts it."""
    oracle = fresh(spec)
    for path, layer in adapter_modules(adapted):
        w = {k: v.detach().clone() for k, v in layer.adapters["default"].state_dict().items()}

        def delta(z, w=w):
            return scaling * (torch.relu(z @ w["down.weight"].T + w["down.bias"]) @ w["up.weight"].T + w["up.bias"])

        if placement == "series":  # on the sublayer's output projection: y + Δ(y)
            oracle.get_submodule(path).register_forward_hook(lambda m, args, y, delta=delta: y + delta(y))
        else:  # on the attention / MLP module itself: F(x) + Δ(x)
            def add(m, args, kwargs, out, delta=delta):
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                return (out[0] + delta(x), *out[1:]) if isinstance(out, tuple) else out + delta(x)
            oracle.get_submodule(path.rpartition(".")[0]).register_forward_hook(add, with_kwargs=True)
    return oracle


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("placement", ["series", "parallel"])
def test_adapters_sit_where_the_papers_put_them(spec, placement):
    model = apply_adapter(fresh(spec), AdapterConfig(size=8, placement=placement, scaling=2.0))
    randomize(model)
    expected = logits(hooked_oracle(model, spec, placement, scaling=2.0))
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(model), logits(fresh(spec)), atol=1e-2)


@pytest.mark.parametrize("spec,targets", [("tiny-llama", ["self_attn.o_proj", "mlp.down_proj"]),
                                          ("tiny-gpt2", ["attn.c_proj", "mlp.c_proj"])])
@pytest.mark.parametrize("placement", ["series", "parallel"])
def test_default_targets_and_trainable_count(spec, targets, placement):
    model = apply_adapter(fresh(spec), AdapterConfig(size=8, placement=placement))
    wrapped = [p for p, m in model.named_modules() if isinstance(m, AdapterLinear)]
    assert [p.split(".", 3)[-1] for p in wrapped] == targets * 2
    trainable, _ = trainable_parameters(model)
    # 2 layers × 2 projections × (down 64·8 + 8, up 8·64 + 64): the hidden size is 64 in both
    assert trainable == 4 * (64 * 8 + 8 + 8 * 64 + 64)
    assert all(".adapters.default." in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("placement", ["series", "parallel"])
def test_save_load_round_trip(tmp_path, spec, placement):
    model = apply_adapter(fresh(spec), AdapterConfig(size=4, activation="gelu", placement=placement, scaling=4.0))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(fresh(spec), tmp_path / "a")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert trainable_parameters(loaded)[0] == 0
    config = (tmp_path / "a" / "adapter_config.json").read_text()
    assert '"peft_type": "LLMLAB_ADAPTER"' in config and f'"placement": "{placement}"' in config
    again = load_adapter(fresh(spec), tmp_path / "a", trainable=True)
    assert trainable_parameters(again)[0] == trainable_parameters(model)[0]


def test_series_and_parallel_switch_disable_delete_copy():
    base = logits(fresh())
    model = apply_adapter(fresh(), AdapterConfig(size=4), name="s")
    apply_adapter(model, AdapterConfig(size=4, placement="parallel"), name="p")
    randomize(model)
    assert adapter_names(model) == ["s", "p"]
    assert type(model.model.layers[0].self_attn.o_proj.base_layer) is nn.Linear  # one wrapper holds both
    out_p = logits(model)
    set_adapter(model, "s")
    out_s = logits(model)
    assert not torch.allclose(out_s, out_p)
    with disabled(model):
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(copy.deepcopy(model)), out_s)  # e.g. a frozen reference copy
    set_adapter(model, "p")
    assert torch.equal(logits(copy.deepcopy(model)), out_p)  # the copy's hooks feed the copy's layers
    delete_adapter(model, "p")
    set_adapter(model, "s")
    assert torch.equal(logits(model), out_s)
    delete_adapter(model, "s")
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("placement", ["series", "parallel"])
def test_a_few_steps_reduce_the_loss(placement):
    model = apply_adapter(fresh(), AdapterConfig(size=8, placement=placement)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_stacks_with_lora_on_a_conv1d_layer():
    model = apply_lora(fresh("tiny-gpt2"), LoraConfig(r=4, targets=["mlp.c_proj"]))
    apply_adapter(model, AdapterConfig(size=4, placement="parallel"), name="ad")
    adapter = model.transformer.h[0].mlp.c_proj.adapters["ad"]
    assert (adapter.down.in_features, adapter.up.out_features) == (64, 64)  # not Conv1D's stored (256, 64)
    set_adapter(model, ["default", "ad"])
    randomize(model)
    assert logits(model).shape == (2, 8, model.config.vocab_size)


def test_bad_input():
    with pytest.raises(LlmlabError, match="size must be a positive integer"):
        AdapterConfig(size=0)
    with pytest.raises(LlmlabError, match=r"adapter.activation must be one of relu, gelu, silu, tanh"):
        apply_method(fresh(), "adapter", {"activation": "swish"})
    with pytest.raises(LlmlabError, match="did you mean 'placement'"):
        apply_method(fresh(), "adapter", {"placment": "parallel"})
    with pytest.raises(LlmlabError, match="cannot be merged"):
        merge(apply_adapter(fresh()))
    opt = fresh("tiny-opt")
    with pytest.raises(LlmlabError, match=r"layers.0.fc2 sits directly in decoder layer.*placement series"):
        apply_adapter(opt, AdapterConfig(placement="parallel"))
    assert not adapter_modules(opt)  # refused before anything was wrapped
    apply_adapter(opt, AdapterConfig(placement="parallel", targets=["out_proj"]))
    with pytest.raises(LlmlabError, match="ran without its block"):
        opt.model.decoder.layers[0].self_attn.out_proj(torch.randn(1, 64))

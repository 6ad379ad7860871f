import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmlab.errors import LlmlabError
from llmlab.peft import (IA3Config, LoraConfig, apply_ia3, apply_lora, apply_method, disabled, load_adapter, merge,
                         merge_and_unload, save_adapter, set_adapter, trainable_parameters, unmerge)
from llmlab.peft.base import adapter_modules
from llmlab.peft.ia3 import IA3, IA3Linear, from_peft
from llmlab.peft.lora import LoraLinear
from llmlab.peft.targets import weight_of
from tests.peft.oracle import fresh, logits, peft_logits, peft_save, randomize


def randomize_scales(model):
    """Vectors near one (as trained ones are), with a different value in every entry."""
    torch.manual_seed(1)
    for _, module in adapter_modules(model):
        for p in module.adapters.parameters() if isinstance(module, IA3Linear) else ():
            with torch.no_grad():
                p.copy_(1 + 0.3 * torch.randn_like(p))


@pytest.mark.parametrize("base", [nn.Linear(6, 4), Conv1D(4, 6)], ids=["linear", "conv1d"])
def test_ia3_layer_is_the_paper_equation(base):
    torch.manual_seed(0)
    nn.init.normal_(base.bias)
    for feedforward in (False, True):
        layer = IA3Linear(base)
        layer.add("default", IA3(6, 4, feedforward, IA3Config()))
        layer.active = ["default"]
        x = torch.randn(3, 6)
        assert torch.equal(layer(x), base(x))  # l starts at ones
        scale = layer.adapters["default"].scale
        nn.init.normal_(scale)
        W, b = weight_of(base), base.bias
        # feed-forward layers rescale their input (the FFN activations), the others their output (keys, values)
        expected = (x * scale) @ W.T + b if feedforward else scale.flatten() * (x @ W.T + b)
        assert scale.shape == ((1, 6) if feedforward else (4, 1))  # peft's shapes for ia3_l
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_defaults_follow_peft():
    model = apply_ia3(fresh())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert [type(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.up_proj, mlp.down_proj)] == \
           [nn.Linear, IA3Linear, IA3Linear, nn.Linear, IA3Linear]
    assert mlp.down_proj.adapters["default"].feedforward and not attn.k_proj.adapters["default"].feedforward
    trainable, _ = trainable_parameters(model)
    assert trainable == 2 * (32 + 32 + 128)  # tiny-llama: k and v outputs (32 each), down_proj's input (128)


def ia3_model(spec: str, **options):
    model = apply_ia3(fresh(spec), IA3Config(**options))
    randomize_scales(model)
    return model.eval()


@pytest.mark.parametrize("spec,options", [("tiny-llama", {}), ("tiny-gpt2", {}),
                                          ("tiny-llama", {"targets": ["q_proj", "mlp.down_proj", "up_proj"]}),
                                          ("tiny-llama", {"targets": ["all-linear"], "feedforward": ["down_proj"]})])
def test_llmlab_ia3_loads_in_peft(tmp_path, spec, options):
    model = ia3_model(spec, **options)
    save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(peft_logits(tmp_path / "a", spec), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_peft_ia3_loads_in_llmlab(tmp_path, spec):
    from peft import IA3Config as PeftIA3

    expected = peft_save(PeftIA3(), tmp_path / "p", spec)
    model = load_adapter(fresh(spec), tmp_path / "p")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_merge_unmerge_and_unload(spec):
    model = ia3_model(spec)
    before = logits(model)
    weights = {n: p.clone() for n, p in model.named_parameters() if "adapters" not in n}
    merge(model)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    unmerge(model)
    for n, p in model.named_parameters():
        if "adapters" not in n:
            torch.testing.assert_close(p, weights[n], rtol=1e-6, atol=0, msg=n)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, IA3Linear) for m in plain.modules())
    torch.testing.assert_close(logits(plain), before, rtol=0, atol=1e-5)


def test_unmerge_restores_what_a_zero_scale_erased():
    base = nn.Linear(6, 4)
    original = (base.weight.clone(), base.bias.clone())
    for feedforward in (False, True):
        layer = IA3Linear(base)
        layer.add("default", IA3(6, 4, feedforward, IA3Config()))
        with torch.no_grad():
            layer.adapters["default"].scale[0, 0] = 0.0
        layer.merge("default")
        assert (weight_of(base)[:, 0] == 0).all() if feedforward else (base.weight[0] == 0).all()
        layer.unmerge("default")  # dividing by zero would give nan: the erased weights come back exactly
        assert torch.equal(base.weight, original[0]) and torch.equal(base.bias, original[1])


def test_several_adapters_multiply():
    model = apply_ia3(fresh(), name="a")
    apply_ia3(model, IA3Config(targets=["k_proj", "up_proj"]), name="b")
    randomize_scales(model)
    k_proj = model.model.layers[0].self_attn.k_proj
    x = torch.randn(2, 64)
    set_adapter(model, ["a", "b"])
    with torch.no_grad():
        both = k_proj(x)
        with disabled(model):
            plain = k_proj(x)
    la, lb = (k_proj.adapters[n].scale.flatten() for n in ("a", "b"))
    torch.testing.assert_close(both, plain * la * lb, rtol=1e-6, atol=1e-7)
    before = logits(model)
    merge(model)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)


def test_ia3_over_lora():
    model = apply_lora(fresh(), LoraConfig(r=4, targets=["k_proj", "down_proj"]), name="a")
    apply_ia3(model, name="b")
    randomize(model)  # LoRA's A and B
    randomize_scales(model)
    for layer in (model.model.layers[0].self_attn.k_proj, model.model.layers[0].mlp.down_proj):
        assert type(layer) is IA3Linear and type(layer.base_layer) is LoraLinear
    set_adapter(model, ["a", "b"])
    both = logits(model)
    with pytest.raises(LlmlabError, match="cannot merge adapter 'b' alone: .*lora adapters a sit inside"):
        merge(model, ["b"])
    plain = merge_and_unload(model)
    assert type(plain.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(logits(plain), both, rtol=0, atol=1e-5)


def test_bad_input():
    with pytest.raises(LlmlabError, match="feedforward module 'down_proj' is not in targets"):
        IA3Config(targets=["k_proj"], feedforward=["down_proj"])
    with pytest.raises(LlmlabError, match="regex feedforward_modules"):
        from_peft({"peft_type": "IA3", "target_modules": ".*proj", "feedforward_modules": ".*down_proj"})
    with pytest.raises(LlmlabError, match="unknown key 'ia3.feed_forward'"):
        apply_method(fresh(), "ia3", {"feed_forward": ["down_proj"]})
    model = apply_method(fresh(), "ia3", {"targets": ["k_proj"], "feedforward": []})
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear

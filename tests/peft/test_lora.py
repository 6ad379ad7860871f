import json

import pytest
import torch
from torch import nn

from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.peft import (LoraConfig, adapter_names, apply_lora, apply_method, delete_adapter, disabled, load_adapter,
                         merge, merge_and_unload, save_adapter, set_adapter, trainable_parameters, unmerge)
from llmlab.peft.lora import LoRA, LoraLinear
from tests.peft.oracle import fresh, logits, peft_logits, peft_save, randomize


def test_lora_layer_is_the_paper_equation():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = LoraLinear(base)
    layer.add("default", LoRA(6, 4, LoraConfig(r=2, alpha=6)))
    layer.active = ["default"]
    lora = layer.adapters["default"]
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), base(x))  # B starts at zero: training starts from the base model
    nn.init.normal_(lora.B.weight)
    expected = base(x) + 3.0 * x @ lora.A.weight.T @ lora.B.weight.T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_rslora_scaling():
    assert LoraConfig(r=16, alpha=8).scaling == 0.5
    assert LoraConfig(r=16, alpha=8, rslora=True).scaling == 2.0


def test_only_adapter_parameters_train():
    model = apply_lora(fresh(), LoraConfig(r=4))
    trainable, total = trainable_parameters(model)
    # tiny-llama: 2 layers × (q_proj 64→64 + v_proj 64→32) × r=4
    assert trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert all("adapters" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("rslora", [False, True])
def test_llmlab_adapter_loads_in_peft(tmp_path, rslora):
    model = apply_lora(fresh(), LoraConfig(r=4, alpha=8, rslora=rslora, targets=["q_proj", "v_proj", "down_proj"]))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(peft_logits(tmp_path / "a"), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_peft_adapter_loads_in_llmlab(tmp_path, spec):
    from peft import LoraConfig as PeftLora

    targets = ["c_attn", "c_fc"] if spec == "tiny-gpt2" else ["q_proj", "k_proj", "up_proj"]
    expected = peft_save(PeftLora(r=4, lora_alpha=16, target_modules=targets, fan_in_fan_out=spec == "tiny-gpt2"),
                         tmp_path / "p", spec)
    model = load_adapter(fresh(spec), tmp_path / "p")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


def test_merge_unmerge_and_unload():
    model = apply_lora(fresh(), LoraConfig(r=4, targets=["all-linear"]))
    randomize(model)
    before = logits(model)
    merge(model)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    plain = merge_and_unload(model)
    assert not any("adapters" in n for n, _ in plain.named_modules())
    assert all(type(m) is not LoraLinear for m in plain.modules())
    torch.testing.assert_close(logits(plain), before, rtol=0, atol=1e-5)


def test_named_adapters_switch_disable_delete():
    base = logits(fresh())
    model = apply_lora(fresh(), LoraConfig(r=4), name="a")
    apply_lora(model, LoraConfig(r=2, targets=["k_proj"]), name="b")
    randomize(model)
    assert adapter_names(model) == ["a", "b"]
    set_adapter(model, "a")
    out_a = logits(model)
    set_adapter(model, "b")
    out_b = logits(model)
    assert not torch.allclose(out_a, out_b)
    with disabled(model):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(model), out_b, rtol=0, atol=0)
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"]
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear  # unwrapped: no adapter left there
    set_adapter(model, "a")
    torch.testing.assert_close(logits(model), out_a, rtol=0, atol=0)


def test_bad_input():
    with pytest.raises(LlmlabError, match="r must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(LlmlabError, match=r"match no layer.*q_proj"):
        apply_lora(fresh(), LoraConfig(targets=["qproj"]))
    with pytest.raises(LlmlabError, match="unknown key 'lora.rank'"):
        apply_method(fresh(), "lora", {"rank": 4})
    with pytest.raises(LlmlabError, match="did you mean 'lora'"):
        apply_method(fresh(), "loar", {})
    with pytest.raises(LlmlabError, match="no adapter named 'x'"):
        set_adapter(apply_lora(fresh()), "x")


def test_adapter_for_another_base_is_refused(tmp_path):
    save_adapter(apply_lora(fresh("tiny-llama"), LoraConfig(targets=["q_proj"])), tmp_path / "a")
    wider = fresh()
    wider.config.hidden_size = 96  # a base whose q_proj has other shapes
    wider.model.layers[0].self_attn.q_proj = nn.Linear(96, 64, bias=False)
    with pytest.raises(LlmlabError, match=r"different base model: .*layers.0.self_attn.q_proj.lora_A.weight "
                                          r"has shape \(8, 64\) in the file but \(8, 96\) here"):
        load_adapter(wider, tmp_path / "a")
    with pytest.raises(LlmlabError, match="match no layer"):
        load_adapter(fresh("tiny-gpt2"), tmp_path / "a")


@pytest.mark.parametrize("spec, expected", [("tiny-llama", "tiny-llama"),
                                            pytest.param("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                         marks=pytest.mark.slow)])
def test_adapter_config_names_the_base_model_as_other_tools_know_it(tmp_path, spec, expected):
    model, _ = load_model(spec)
    apply_lora(model, LoraConfig(r=2, targets=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    fields = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert fields["base_model_name_or_path"] == expected

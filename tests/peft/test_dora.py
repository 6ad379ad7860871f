import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmlab.errors import LlmlabError
from llmlab.peft import (DoraConfig, LoraConfig, adapter_names, apply_dora, apply_lora, apply_method, delete_adapter,
                         load_adapter, merge, merge_and_unload, save_adapter, set_adapter, trainable_parameters,
                         unmerge)
from llmlab.peft.dora import DoRA, DoraLinear
from llmlab.peft.io import PREFIX, config_from_peft
from llmlab.peft.lora import LoraLinear
from llmlab.peft.targets import weight_of
from tests.peft.oracle import IDS, fresh, logits, peft_logits, peft_save, randomize


def toy(base: nn.Module, cfg=DoraConfig(r=2, alpha=6)) -> DoraLinear:
    torch.manual_seed(0)
    layer = DoraLinear(base)
    layer.add("default", DoRA(base, cfg))
    layer.active = ["default"]
    return layer


def randomize_toy(dora: DoRA):
    nn.init.normal_(dora.B.weight)
    with torch.no_grad():
        dora.magnitude.mul_(torch.rand_like(dora.magnitude) + 0.5)


def decomposed(W, dora: DoRA, detach_norm: bool = True):
    """The paper's W' = m · (W + sBA) / ‖W + sBA‖_c, formed explicitly."""
    V = W + 3.0 * dora.B.weight @ dora.A.weight  # s = alpha / r = 3
    norm = V.norm(dim=1, keepdim=True)
    return dora.magnitude[:, None] * V / (norm.detach() if detach_norm else norm)


@pytest.mark.parametrize("base", [nn.Linear(6, 4), Conv1D(4, 6)], ids=["linear", "conv1d"])
def test_dora_layer_is_the_paper_equation(base):
    nn.init.normal_(base.bias)
    layer = toy(base)
    dora = layer.adapters["default"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(dora.magnitude, weight_of(base).norm(dim=1), rtol=0, atol=0)  # m = ‖W‖_c
    assert torch.equal(layer(x), base(x))  # m/n = 1 and B = 0: training starts from the base model
    randomize_toy(dora)
    expected = x @ decomposed(weight_of(base), dora).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_dora_gradients_treat_the_norm_as_constant():
    base = nn.Linear(6, 4)
    layer = toy(base)
    dora = layer.adapters["default"]
    randomize_toy(dora)
    x, target = torch.randn(5, 6), torch.randn(5, 4)
    params = [dora.A.weight, dora.B.weight, dora.magnitude]

    def grads(out):
        return torch.autograd.grad((out - target).pow(2).sum(), params)

    ours = grads(layer(x))
    constant = grads(x @ decomposed(base.weight, dora).T + base.bias)
    through_norm = grads(x @ decomposed(base.weight, dora, detach_norm=False).T + base.bias)
    for g, e in zip(ours, constant):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # the check can fail: differentiating through the norm gives other gradients for A and B
    assert not torch.allclose(ours[0], through_norm[0], atol=1e-4)


def test_only_adapter_parameters_train():
    model = apply_dora(fresh(), DoraConfig(r=4))
    trainable, _ = trainable_parameters(model)
    # tiny-llama: 2 layers × (q_proj 64→64 + v_proj 64→32): LoRA's A, B and a magnitude per output
    assert trainable == 2 * (4 * (64 + 64) + 64 + 4 * (64 + 32) + 32)
    assert all("adapters" in n for n, p in model.named_parameters() if p.requires_grad)


def dora_model(spec: str, **options):
    targets = ["c_attn", "mlp.c_proj"] if spec == "tiny-gpt2" else ["q_proj", "v_proj", "down_proj"]
    model = apply_dora(fresh(spec), DoraConfig(**{"r": 4, "alpha": 8, "targets": targets, **options}))
    randomize(model)
    return model.eval()


@pytest.mark.parametrize("spec,options", [("tiny-llama", {"rslora": True}), ("tiny-llama", {"targets": ["all-linear"]}),
                                          ("tiny-gpt2", {})])
def test_llmlab_dora_loads_in_peft(tmp_path, spec, options):
    model = dora_model(spec, **options)
    save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(peft_logits(tmp_path / "a", spec), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_peft_dora_loads_in_llmlab(tmp_path, spec):
    from peft import LoraConfig as PeftLora

    targets = ["c_attn", "c_fc"] if spec == "tiny-gpt2" else ["q_proj", "k_proj", "up_proj"]
    expected = peft_save(PeftLora(r=4, lora_alpha=16, target_modules=targets, use_dora=True,
                                  fan_in_fan_out=spec == "tiny-gpt2"), tmp_path / "p", spec)
    model = load_adapter(fresh(spec), tmp_path / "p")
    assert adapter_names(model) == ["default"] and isinstance(model.get_submodule(_first(targets, spec)), DoraLinear)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


def _first(targets, spec):
    return f"transformer.h.0.attn.{targets[0]}" if spec == "tiny-gpt2" else f"model.layers.0.self_attn.{targets[0]}"


def peft_twin(model, tmp_path, spec="tiny-llama"):
    from peft import PeftModel

    save_adapter(model, tmp_path / "a")
    return PeftModel.from_pretrained(fresh(spec), str(tmp_path / "a"), is_trainable=True)


def test_gradients_match_peft(tmp_path):
    model = dora_model("tiny-llama")
    twin = peft_twin(model, tmp_path)
    for m in (model, twin):
        m.train()
        m(input_ids=IDS).logits.pow(2).mean().backward()
    ours = {f"{PREFIX}{path}.{theirs}": module.adapters["default"].get_parameter(key).grad
            for path, module in model.named_modules() if isinstance(module, DoraLinear)
            for key, theirs in DoraLinear.peft_keys.items()}
    theirs = {n.replace(".default", "").replace("vector.weight", "vector"): p.grad
              for n, p in twin.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 3 * 3
    for key, grad in ours.items():
        torch.testing.assert_close(grad, theirs[key], rtol=0, atol=1e-5, msg=key)


def test_dropout_in_training_matches_peft(tmp_path):
    # with dropout, W x is recomputed from the dropped input: same random mask, same numbers as peft
    model = dora_model("tiny-llama", dropout=0.3)
    twin = peft_twin(model, tmp_path)
    outs = []
    for m in (model.train(), twin.train()):
        torch.manual_seed(7)
        outs.append(m(input_ids=IDS).logits.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    assert not torch.allclose(outs[0], logits(model.eval()), atol=1e-3)  # dropout did act


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_merge_unmerge_and_unload(spec):
    model = dora_model(spec, targets=["all-linear"])
    before = logits(model)
    merge(model)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    plain = merge_and_unload(model)
    assert not any("adapters" in n for n, _ in plain.named_modules())
    torch.testing.assert_close(logits(plain), before, rtol=0, atol=1e-5)


def test_two_active_doras_on_one_layer_merge(tmp_path):
    # each adapter's n comes from the unmerged W, also when another one is merged into it already
    model = apply_dora(fresh(), DoraConfig(r=4, targets=["q_proj"]), name="b1")
    apply_dora(model, DoraConfig(r=2, targets=["q_proj", "v_proj"]), name="b2")
    randomize(model)
    set_adapter(model, ["b1", "b2"])
    before = logits(model)
    merge(model, ["b1"])  # b2 still runs on top of the merged b1
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    merge(model)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)


def test_lora_and_dora_on_one_layer(tmp_path):
    """DoRA decomposes the pretrained W, so it goes inside a LoRA already on the layer."""
    from peft import PeftModel

    model = apply_lora(fresh(), LoraConfig(r=4, targets=["q_proj", "v_proj"]), name="a")
    apply_dora(model, DoraConfig(r=2, targets=["q_proj", "k_proj"]), name="b")
    randomize(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is LoraLinear and type(q_proj.base_layer) is DoraLinear
    assert type(q_proj.base_layer.base_layer) is nn.Linear
    set_adapter(model, ["a", "b"])
    both = logits(model)
    # peft holds both in one layer and runs them in the active order: DoRA first, then LoRA on top
    save_adapter(model, tmp_path / "a", "a")
    save_adapter(model, tmp_path / "b", "b")
    twin = PeftModel.from_pretrained(fresh(), str(tmp_path / "b"), adapter_name="b")
    twin.load_adapter(str(tmp_path / "a"), adapter_name="a")
    twin.base_model.set_adapter(["b", "a"])
    torch.testing.assert_close(logits(twin), both, rtol=0, atol=1e-5)

    with pytest.raises(LlmlabError, match="cannot merge adapter 'a' alone: .*dora adapters b sit inside it"):
        merge(model, ["a"])
    merge(model)
    torch.testing.assert_close(logits(model), both, rtol=0, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(logits(model), both, rtol=0, atol=1e-5)
    delete_adapter(model, "b")
    assert type(model.model.layers[0].self_attn.q_proj.base_layer) is nn.Linear
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear


def test_lora_over_dora_merge_and_unload_gpt2():
    model = apply_dora(fresh("tiny-gpt2"), DoraConfig(r=2, targets=["c_attn"]), name="b")
    apply_lora(model, LoraConfig(r=4, targets=["c_attn", "c_fc"]), name="a")
    randomize(model)
    set_adapter(model, ["a", "b"])
    both = logits(model)
    plain = merge_and_unload(model)
    assert type(plain.transformer.h[0].attn.c_attn) is Conv1D
    torch.testing.assert_close(logits(plain), both, rtol=0, atol=1e-5)


def test_config_and_dispatch():
    lora_fields = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    assert config_from_peft({**lora_fields, "use_dora": True}) == ("dora", DoraConfig(r=4, alpha=8.0,
                                                                                     targets=["q_proj"]))
    assert config_from_peft(lora_fields)[0] == "lora"
    model = apply_method(fresh(), "dora", {"r": 2, "targets": ["q_proj"]})
    assert type(model.model.layers[1].self_attn.q_proj) is DoraLinear
    with pytest.raises(LlmlabError, match="unknown key 'dora.rank'"):
        apply_method(fresh(), "dora", {"rank": 4})
    with pytest.raises(LlmlabError, match="r must be a positive integer"):
        DoraConfig(r=0)

import pytest
import torch

from llmlab.errors import LlmlabError
from llmlab.models.tiny import byte_tokenizer
from llmlab.peft import (PrefixConfig, PromptConfig, adapter_names, apply_method, apply_prefix, apply_prompt,
                         delete_adapter, disabled, ensemble, load_adapter, save_adapter, set_adapter)
from tests.peft.oracle import (IDS, fresh, hf_generate, lively, llmlab_generate, logits, peft_logits, peft_save,
                               randomize, stepwise_greedy)


def test_soft_prompt_is_prepended_to_the_input():
    """Re-derive the adapted model: the base model run on [P; E(x)], the first n positions dropped."""
    model = apply_prompt(fresh(), PromptConfig(virtual_tokens=3))
    randomize(model)
    P = model.prompt_adapters.adapters["default"].weight  # (3, 64)
    B, T = IDS.shape
    embeds = torch.cat([P.expand(B, 3, 64), model.get_input_embeddings()(IDS)], dim=1)  # (B, 3 + T, 64)
    with disabled(model), torch.no_grad():
        expected = model(inputs_embeds=embeds)
        loss = model(inputs_embeds=embeds, labels=torch.cat([torch.full((B, 3), -100), IDS], dim=1)).loss
    assert logits(model).shape == (B, T, 320)  # callers see their own length
    torch.testing.assert_close(logits(model), expected.logits[:, 3:], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS, labels=IDS).loss, loss, rtol=0, atol=1e-6)


def test_initialisations():
    torch.manual_seed(0)
    model = fresh()
    table = model.get_input_embeddings().weight
    text = apply_prompt(model, PromptConfig(virtual_tokens=5, init="text", init_text="ab"), name="text",
                        tokenizer=byte_tokenizer())
    ids = byte_tokenizer()("ab").input_ids
    torch.testing.assert_close(text.prompt_adapters.adapters["text"].weight, table[ids * 3][:5], rtol=0, atol=0)
    vocab = apply_prompt(model, PromptConfig(virtual_tokens=4, init="vocab"), name="vocab").prompt_adapters
    assert all((row == table).all(dim=1).any() for row in vocab.adapters["vocab"].weight)  # rows of the table
    random = apply_prompt(model, PromptConfig(virtual_tokens=4), name="random").prompt_adapters.adapters["random"]
    assert random.weight.abs().max() <= 0.5 and random.weight.std() > 0.2


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_llmlab_prompt_loads_in_peft(tmp_path, spec):
    model = apply_prompt(fresh(spec), PromptConfig(virtual_tokens=4, init="vocab"))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    # peft's logits include the virtual positions
    torch.testing.assert_close(peft_logits(tmp_path / "a", spec)[:, 4:], logits(model), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(load_adapter(fresh(spec), tmp_path / "a")), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_peft_prompt_loads_in_llmlab(tmp_path, spec):
    from peft import PromptTuningConfig

    expected = peft_save(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), tmp_path / "p", spec)
    model = load_adapter(fresh(spec), tmp_path / "p")
    torch.testing.assert_close(logits(model), expected[:, 5:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_generation_matches_peft(tmp_path, spec):
    from peft import PeftModel

    model = apply_prompt(lively(fresh(spec)), PromptConfig(virtual_tokens=3))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    theirs = PeftModel.from_pretrained(lively(fresh(spec)), str(tmp_path / "a")).eval()
    prompts = [[5, 17, 99, 3, 40, 41], [8, 9]]
    alone = [stepwise_greedy(theirs, p, 8) for p in prompts]  # peft's forward: see test_prefix.py
    assert llmlab_generate(model, prompts[:1], 8) == alone[:1]
    # A left-padded batch: llmlab shifts the given position ids by n, so a padded row generates what it
    # would alone. peft discards position ids for prompt tuning, so its padded rows differ: compare alone.
    assert llmlab_generate(model, prompts, 8) == alone == hf_generate(model, prompts, 8)
    assert len(set(map(tuple, alone))) == 2 and all(len(set(row)) > 2 for row in alone)  # not a degenerate repeat


def test_ensemble_averages_the_prompts_distributions():
    model = apply_prompt(fresh(), PromptConfig(virtual_tokens=3), name="a")
    apply_prompt(model, PromptConfig(virtual_tokens=3), name="b")
    apply_prompt(model, PromptConfig(virtual_tokens=3), name="c")
    randomize(model)
    probs = []
    for name in "abc":
        set_adapter(model, name)
        probs.append(torch.softmax(logits(model), dim=-1))
    mixed = ensemble(model, ["a", "b", "c"], IDS)  # (B, T, V), one forward pass of 3·B rows
    torch.testing.assert_close(mixed, torch.log(sum(probs) / 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(IDS.shape), rtol=0, atol=1e-5)
    torch.testing.assert_close(ensemble(model, ["c"], IDS), probs[2].log(), rtol=0, atol=1e-5)
    assert model.prompt_adapters.rows is None  # the per-row setting ends with the call


def test_switch_disable_delete():
    base = logits(fresh())
    model = apply_prompt(fresh(), PromptConfig(virtual_tokens=2), name="a")
    apply_prompt(model, PromptConfig(virtual_tokens=4), name="b")
    randomize(model)
    set_adapter(model, "a")
    out_a = logits(model)
    set_adapter(model, "b")
    assert not torch.allclose(logits(model), out_a)
    with disabled(model):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    delete_adapter(model, "b")
    set_adapter(model, "a")
    torch.testing.assert_close(logits(model), out_a, rtol=0, atol=0)
    delete_adapter(model, "a")
    assert not hasattr(model, "prompt_adapters") and adapter_names(model) == []
    assert not model._forward_pre_hooks and not model._forward_hooks
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model = apply_prompt(fresh(), PromptConfig(virtual_tokens=4)).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [p.shape for p in trainable] == [(4, 64)]
    optimizer = torch.optim.Adam(trainable, lr=3e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_refusals():
    with pytest.raises(LlmlabError, match="init=text and init_text go together"):
        PromptConfig(init="text")
    with pytest.raises(LlmlabError, match="unknown key 'prompt.num_virtual_tokens'"):
        apply_method(fresh(), "prompt", {"num_virtual_tokens": 4})
    with pytest.raises(LlmlabError, match="needs a tokenizer"):
        apply_prompt(fresh(), PromptConfig(init="text", init_text="hi"))
    model = apply_prompt(fresh(), PromptConfig(virtual_tokens=2), name="p")
    apply_prefix(model, PrefixConfig(virtual_tokens=2), name="q")
    set_adapter(model, ["p", "q"])
    with pytest.raises(LlmlabError, match="only one prompt or prefix adapter .* p, q are active"):
        logits(model)
    set_adapter(model, "p")
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)  # two examples per row, told apart by their positions
    with pytest.raises(LlmlabError, match="cannot run packed rows"):
        model(input_ids=IDS, position_ids=packed)

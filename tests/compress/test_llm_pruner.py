import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmlab.compress.llm_pruner import (LLMPrunerConfig, group_importance, layer_dims, n_params, plan,
                                        prune_llm_pruner)
from llmlab.errors import LlmlabError
from llmlab.models import load_model, save_model
from llmlab.models.layers import decoder_layers

CALIB = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))


def fresh(spec="tiny-llama"):
    return load_model(spec)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("attention", ["heads", "groups", "none"])
def test_shapes_param_count_and_plain_transformers_reload(spec, attention, tmp_path):
    model, tok = fresh(spec)
    total = n_params(model)
    prune_llm_pruner(model, CALIB, LLMPrunerConfig(ratio=0.3, attention=attention))
    c = model.config
    heads, kv, ffn = c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    assert (heads, kv) == {"heads": (2, 2), "groups": (2, 1), "none": (4, 2)}[attention]
    for layer in decoder_layers(model):
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj.weight.shape == (heads * 16, 64) and a.o_proj.weight.shape == (64, heads * 16)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (kv * 16, 64)
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (ffn, 64)
        assert m.down_proj.weight.shape == (64, ffn)
    # The FFN channel count is the one that lands nearest 30% removed: within half a channel per layer.
    per_channel = 3 * 64 * len(decoder_layers(model))
    assert abs((total - n_params(model)) - 0.3 * total) <= per_channel / 2 + 1
    logits = model(X).logits
    save_model(model, tok, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # plain transformers, no llmlab code
    assert n_params(plain) == n_params(model)
    torch.testing.assert_close(plain(X).logits, logits, rtol=0, atol=1e-5)
    assert plain.generate(X[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 20)


def test_taylor_importance_equals_direct_w_times_grad():
    model, _ = fresh()
    dims = layer_dims(model)
    scores = group_importance(model, CALIB, LLMPrunerConfig(batch_size=2), dims)
    # Direct: one backward of the mean loss over all windows (the batches' mean of means is the same here).
    model.zero_grad()
    logits = model(input_ids=CALIB).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), CALIB[:, 1:].flatten()).backward()
    for layer, s in zip(decoder_layers(model), scores):
        a, m = layer.self_attn, layer.mlp
        e = lambda lin: (lin.weight * lin.weight.grad).abs().detach()  # noqa: E731
        channel = e(m.gate_proj).sum(1) + e(m.up_proj).sum(1) + e(m.down_proj).sum(0)
        head = torch.stack([e(a.q_proj)[h * 16:(h + 1) * 16].sum() + e(a.o_proj)[:, h * 16:(h + 1) * 16].sum()
                            for h in range(4)])
        kv = torch.stack([e(a.k_proj)[j * 16:(j + 1) * 16].sum() + e(a.v_proj)[j * 16:(j + 1) * 16].sum()
                          for j in range(2)])
        torch.testing.assert_close(s["channel"], channel, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(s["head"], head, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(s["kv"], kv, rtol=1e-4, atol=1e-9)


def test_pruned_model_is_the_masked_dense_model():
    """Removing groups = zeroing their output paths: the pruned model's logits equal the dense model's with
    the removed heads' o_proj columns and the removed channels' down_proj columns set to zero."""
    dense, _ = fresh()
    model, _ = fresh()
    cfg = LLMPrunerConfig(ratio=0.3, attention="heads")
    scores = group_importance(model, CALIB, cfg, layer_dims(model))
    prune_llm_pruner(model, CALIB, cfg)
    keep = model.config.intermediate_size
    with torch.no_grad():
        for layer, s in zip(decoder_layers(dense), scores):
            dropped = s["channel"].topk(128 - keep, largest=False).indices
            layer.mlp.down_proj.weight[:, dropped] = 0
            worst = s["head"].view(2, 2).argmin(1)  # one query head per KV group goes
            for g, r in enumerate(worst.tolist()):
                h = g * 2 + r
                layer.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
    torch.testing.assert_close(model(X).logits, dense(X).logits, rtol=0, atol=1e-5)


def test_plan_for_smollm2_shapes():
    """The split on the built-in model's layer shapes (GQA 9 heads / 3 KV, 576 wide, 1536 FFN, 30 layers),
    built on a meta-device config: 20% -> 2 of 3 query heads per group, 50% -> 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    dims = layer_dims(model)
    assert plan(model, dims, LLMPrunerConfig(ratio=0.2))[:2] == (2, 3)
    assert plan(model, dims, LLMPrunerConfig(ratio=0.5))[:2] == (1, 3)
    with pytest.raises(LlmlabError, match="at most"):
        plan(model, dims, LLMPrunerConfig(ratio=0.9))


def test_baselines_need_no_calibration_and_random_differs():
    a, _ = fresh()
    b, _ = fresh()
    prune_llm_pruner(a, None, LLMPrunerConfig(ratio=0.3, importance="magnitude"))
    prune_llm_pruner(b, None, LLMPrunerConfig(ratio=0.3, importance="random"))
    assert a.config.intermediate_size == b.config.intermediate_size
    assert not torch.equal(a(X).logits, b(X).logits)


def test_lora_recovery_trains_on_the_pruned_model(tmp_path):
    """The recovery recipe: `llmlab finetune --method lora` on the saved pruned folder, then merge."""
    import json

    from llmlab.cli import main

    model, tok = fresh()
    prune_llm_pruner(model, CALIB, LLMPrunerConfig(ratio=0.3))
    save_model(model, tok, tmp_path / "p")
    rows = tmp_path / "t.jsonl"
    rows.write_text("".join(json.dumps({"text": f"line {i} of some text to learn"}) + "\n" for i in range(8)))
    assert main(["finetune", "--model", str(tmp_path / "p"), "--data", str(rows), "--format", "text",
                 "--method", "lora", "--train.max-steps", "2", "--train.batch-size", "4",
                 "--out", str(tmp_path / "ft")]) == 0
    assert main(["merge", "--adapter", str(tmp_path / "ft"), "--out", str(tmp_path / "rec")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "rec" / "model")
    assert n_params(merged) == n_params(model)


@pytest.mark.parametrize("options, match", [
    ({"ratio": 0.0}, "ratio must be in"), ({"ratio": 1.2}, "ratio must be in"),
    ({"attention": "kv"}, "attention must be one of"), ({"importance": "hessian"}, "importance must be one of"),
    ({"batch_size": 0}, "batch_size must be"),
])
def test_bad_config(options, match):
    with pytest.raises(LlmlabError, match=match) as e:
        LLMPrunerConfig(**options)
    assert "\n" not in str(e.value)


def test_bad_model_and_missing_calibration():
    gpt2, _ = load_model("tiny-gpt2")
    with pytest.raises(LlmlabError, match="LLaMA-style"):
        prune_llm_pruner(gpt2, CALIB, LLMPrunerConfig())
    model, _ = fresh()
    with pytest.raises(LlmlabError, match="needs calibration data"):
        prune_llm_pruner(model, None, LLMPrunerConfig())
    with pytest.raises(LlmlabError, match="seq_len >= 2"):
        prune_llm_pruner(model, CALIB[:, :1], LLMPrunerConfig())
    with pytest.raises(LlmlabError, match="at most"):
        prune_llm_pruner(model, CALIB, LLMPrunerConfig(ratio=0.97))


def test_through_the_prune_table():
    """`llmlab prune --method llm_pruner --sparsity R` reaches prune_llm_pruner with ratio R."""
    from llmlab.compress.prune import prune_model

    model, _ = fresh()
    total = n_params(model)
    prune_model(model, "llm_pruner", CALIB, ratio=0.3)
    assert abs(n_params(model) / total - 0.7) < 0.01

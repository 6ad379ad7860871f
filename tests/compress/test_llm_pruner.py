import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmlab.compress.llm_pruner import (LLMPrunerConfig, _layer_params, group_importance, layer_dims, lora_importance,
                                        n_params, plan, prune_llm_pruner, pruned_layers)
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


def smollm2_shaped():
    """The built-in model's layer shapes (GQA 9 heads / 3 KV, 576 wide, 1536 FFN, 30 layers) on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_plan_for_smollm2_shapes():
    """Uniform (no layer skipped): 20% -> 2 of 3 query heads per group, 50% -> 1; 90% cannot be reached."""
    model = smollm2_shaped()
    dims, every = layer_dims(model), range(30)
    assert {(k.n_rep, k.kv) for k in plan(model, dims, every, LLMPrunerConfig(ratio=0.2))} == {(2, 3)}
    assert {(k.n_rep, k.kv) for k in plan(model, dims, every, LLMPrunerConfig(ratio=0.5))} == {(1, 3)}
    with pytest.raises(LlmlabError, match="at most"):
        plan(model, dims, every, LLMPrunerConfig(ratio=0.9))


def test_default_keeps_the_papers_first_and_last_layers_dense():
    """30 layers: the first 4 and last 2 stay dense (the paper's 4..29 of 32), the 24 others lose 20% of the
    whole model between them, within half an FFN channel per layer."""
    model = smollm2_shaped()
    cfg = LLMPrunerConfig(ratio=0.2)
    assert pruned_layers(model, cfg) == range(4, 28)
    dims = layer_dims(model)
    keep = plan(model, dims, range(4, 28), cfg)
    assert keep[:4] == dims[:4] and keep[28:] == dims[28:]
    assert {(k.n_rep, k.kv) for k in keep[4:28]} == {(2, 3)} and len({k.ffn for k in keep[4:28]}) == 1
    layer = decoder_layers(model)[0]
    removed = sum(_layer_params(layer, d) - _layer_params(layer, k) for d, k in zip(dims, keep))
    assert abs(removed - 0.2 * n_params(model)) <= 24 * 3 * 576 / 2
    assert pruned_layers(model, LLMPrunerConfig(skip_first=0, skip_last=0)) == range(30)
    with pytest.raises(LlmlabError, match="at most .* skip fewer"):
        plan(model, dims, range(4, 28), LLMPrunerConfig(ratio=0.75))


def test_skipped_layers_make_a_llmlab_llama_that_saves_reloads_and_generates(tmp_path):
    """Layer 0 kept dense, layer 1 loses 20% of the whole model: an llmlab_llama folder that load_model and plain
    AutoModelForCausalLM (llmlab.models imported) rebuild with the same logits, and that generates the same
    greedy tokens with and without the KV cache."""
    dense, _ = fresh()
    model, tok = fresh()
    total = n_params(model)
    prune_llm_pruner(model, CALIB, LLMPrunerConfig(ratio=0.2, skip_first=1, skip_last=0))
    c = model.config
    assert (type(model).__name__, c.model_type) == ("LlmlabLlamaForCausalLM", "llmlab_llama")
    assert (c.layer_num_attention_heads, c.layer_num_key_value_heads) == ([4, 2], [2, 2])
    assert c.layer_intermediate_sizes[0] == 128 and c.layer_intermediate_sizes[1] < 128
    kept, pruned = decoder_layers(model)
    assert all(torch.equal(p, q) for p, q in zip(kept.parameters(), decoder_layers(dense)[0].parameters()))
    assert pruned.self_attn.q_proj.weight.shape == (2 * 16, 64) and pruned.self_attn.num_key_value_groups == 1
    assert abs((total - n_params(model)) - 0.2 * total) <= 3 * 64 / 2 + 1  # within half an FFN channel
    logits = model(X).logits
    save_model(model, tok, tmp_path / "m")
    for again in (load_model(tmp_path / "m")[0], AutoModelForCausalLM.from_pretrained(tmp_path / "m")):
        assert type(again).__name__ == "LlmlabLlamaForCausalLM" and n_params(again) == n_params(model)
        torch.testing.assert_close(again(X).logits, logits, rtol=0, atol=1e-5)
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cached = model.generate(X[:1], use_cache=True, **greedy)
    assert torch.equal(cached, model.generate(X[:1], use_cache=False, **greedy))
    from llmlab.generation.generate import SamplingConfig, encode, generate

    prompt = torch.tensor([encode(tok, "hello", chat=False)])  # llmlab's own cached decoding, greedy
    expected = model.generate(prompt, use_cache=False, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    text = generate(model, tok, "hello", SamplingConfig(max_new_tokens=4, ignore_eos=True))
    assert text == tok.decode(expected[0, prompt.shape[1]:])


def test_every_layer_alike_stays_a_plain_llama():
    model, _ = fresh()
    prune_llm_pruner(model, CALIB, LLMPrunerConfig(ratio=0.2, skip_first=0, skip_last=0))
    assert (type(model).__name__, model.config.model_type) == ("LlamaForCausalLM", "llama")


def test_head_count_that_does_not_divide_hidden_size_is_written_as_llmlab_llama(tmp_path):
    """MHA, whole groups cut: 3 of 4 heads left, which LlamaConfig refuses (64 % 3); llmlab_llama holds them."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    prune_llm_pruner(model, CALIB, LLMPrunerConfig(ratio=0.1, attention="groups"))
    assert (model.config.model_type, model.config.layer_num_attention_heads) == ("llmlab_llama", [3, 3])
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(again(X).logits, model(X).logits, rtol=0, atol=1e-5)


def test_lora_importance_is_loraprunes_formula_on_a_toy_linear():
    """Ĝ = G_B·A + B·G_A − G_B·G_A from autograd's G_A, G_B equals the chain rule written out with the exact
    G = ∂L/∂W' of the merged weight W' = W + s·BA: G_B = s·G·Aᵀ, G_A = s·Bᵀ·G."""
    from llmlab.peft.lora import LoRA, LoraConfig

    torch.manual_seed(0)
    W, x = torch.randn(6, 5), torch.randn(3, 5)
    lora = LoRA(5, 6, LoraConfig(r=2, alpha=4))
    torch.nn.init.normal_(lora.B.weight)  # B != 0, as after some training
    s, A, B = lora.scaling, lora.A.weight.detach(), lora.B.weight.detach()
    merged = (W + s * B @ A).requires_grad_(True)
    (x @ merged.T).tanh().sum().backward()
    G = merged.grad
    (x @ W.T + lora(x)).tanh().sum().backward()
    expected = ((W + s * B @ A) * (s * G @ A.T @ A + s * B @ B.T @ G - s * s * G @ A.T @ B.T @ G)).abs()
    torch.testing.assert_close(lora_importance(W, lora, lora.A.weight.grad, lora.B.weight.grad), expected)


def test_lora_importance_on_tiny_llama_is_the_sketched_full_gradient():
    """A fresh LoRA has B = 0, so Ĝ = G_B·A = s·G·AᵀA with G the full weight gradient: the scores equal
    Σ|W ⊙ s·G·AᵀA| with the same A (same seed), and the temporary adapter is gone afterwards."""
    from llmlab.peft import adapter_names, apply_lora
    from llmlab.peft.lora import LoraConfig

    model, _ = fresh()
    cfg = LLMPrunerConfig(importance="lora", lora_r=4, batch_size=2)
    scores = group_importance(model, CALIB, cfg, layer_dims(model))
    assert adapter_names(model) == [] and all(p.requires_grad for p in model.parameters())
    model.zero_grad()
    logits = model(input_ids=CALIB).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), CALIB[:, 1:].flatten()).backward()
    twin, _ = fresh()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        apply_lora(twin, LoraConfig(r=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]), name="llm_pruner")
    for layer, twin_layer, s in zip(decoder_layers(model), decoder_layers(twin), scores):
        def e(name):
            lin, lora = layer.get_submodule(name), twin_layer.get_submodule(name).adapters["llm_pruner"]
            A = lora.A.weight.detach()
            return (lin.weight * (lora.scaling * lin.weight.grad @ A.T @ A)).abs().detach()
        channel = e("mlp.gate_proj").sum(1) + e("mlp.up_proj").sum(1) + e("mlp.down_proj").sum(0)
        head = (e("self_attn.q_proj").sum(1) + e("self_attn.o_proj").sum(0)).view(4, 16).sum(1)
        torch.testing.assert_close(s["channel"], channel, rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(s["head"], head, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_lora_importance_prunes_to_the_planned_shapes(ema):
    model, _ = fresh()
    prune_llm_pruner(model, CALIB, LLMPrunerConfig(ratio=0.2, importance="lora", ema=ema, skip_first=1, skip_last=0))
    assert model.config.layer_num_attention_heads == [4, 2]
    assert [layer.mlp.down_proj.in_features for layer in decoder_layers(model)] == model.config.layer_intermediate_sizes


def test_baselines_need_no_calibration_and_random_differs():
    a, _ = fresh()
    b, _ = fresh()
    prune_llm_pruner(a, None, LLMPrunerConfig(ratio=0.3, importance="magnitude"))
    prune_llm_pruner(b, None, LLMPrunerConfig(ratio=0.3, importance="random"))
    assert a.config.intermediate_size == b.config.intermediate_size
    assert not torch.equal(a(X).logits, b(X).logits)


@pytest.mark.parametrize("skip_first", [0, 1])
def test_lora_recovery_trains_on_the_pruned_model(tmp_path, skip_first):
    """The recovery recipe: `llmlab finetune --method lora` on the saved pruned folder (plain or llmlab_llama,
    default LoRA targets), then merge."""
    import json

    from llmlab.cli import main

    model, tok = fresh()
    prune_llm_pruner(model, CALIB, LLMPrunerConfig(ratio=0.3, skip_first=skip_first, skip_last=0))
    save_model(model, tok, tmp_path / "p")
    rows = tmp_path / "t.jsonl"
    rows.write_text("".join(json.dumps({"text": f"line {i} of some text to learn"}) + "\n" for i in range(8)))
    assert main(["finetune", "--model", str(tmp_path / "p"), "--data", str(rows), "--format", "text",
                 "--method", "lora", "--train.max-steps", "2", "--train.batch-size", "4",
                 "--out", str(tmp_path / "ft")]) == 0
    assert main(["merge", "--adapter", str(tmp_path / "ft"), "--out", str(tmp_path / "rec")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "rec" / "model")
    assert n_params(merged) == n_params(model) and merged.config.model_type == model.config.model_type


@pytest.mark.parametrize("options, match", [
    ({"ratio": 0.0}, "ratio must be in"), ({"ratio": 1.2}, "ratio must be in"),
    ({"attention": "kv"}, "attention must be one of"), ({"importance": "hessian"}, "importance must be one of"),
    ({"batch_size": 0}, "batch_size must be"), ({"skip_first": -1}, "0 or more"),
    ({"lora_r": 0}, "lora_r must be"), ({"ema": 1.0}, "ema in"),
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
    with pytest.raises(LlmlabError, match="leave none of the model's 2 layers"):
        prune_llm_pruner(model, CALIB, LLMPrunerConfig(skip_first=1, skip_last=1))
    qwen, _ = load_model("tiny-qwen2")
    with pytest.raises(LlmlabError, match="only in LLaMA models"):
        prune_llm_pruner(qwen, CALIB, LLMPrunerConfig(skip_first=1))
    assert n_params(model) == n_params(fresh()[0]) and n_params(qwen) == n_params(load_model("tiny-qwen2")[0])


def test_through_the_prune_table():
    """`llmlab prune --method llm_pruner --sparsity R` reaches prune_llm_pruner with ratio R."""
    from llmlab.compress.prune import prune_model

    model, _ = fresh()
    total = n_params(model)
    prune_model(model, "llm_pruner", CALIB, ratio=0.3)
    assert abs(n_params(model) / total - 0.7) < 0.01


def test_cli_keeps_a_layer_dense_with_lora_importance(capsys, tmp_path):
    """`llmlab prune --method llm_pruner --options.skip-first 1 --options.importance lora` writes a folder
    load_model reads."""
    import json

    from llmlab.cli import main

    (tmp_path / "calib.txt").write_text("The cat sat on the mat. A dog ran after a red ball in the park. " * 40)
    assert main(["prune", "--model", "tiny-llama", "--method", "llm_pruner", "--sparsity", "0.2", "--calib",
                 "calib.txt", "--n-samples", "4", "--seq-len", "32", "--options.skip-first", "1",
                 "--options.skip-last", "0", "--options.importance", "lora", "--out", "P", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, _ = load_model(tmp_path / "P")
    assert model.config.model_type == "llmlab_llama" and n_params(model) == summary["params"]
    assert abs(summary["params"] / summary["dense_params"] - 0.8) < 0.01


def test_a_llmlab_llama_folder_loads_in_plain_transformers_through_its_auto_map(tmp_path):
    """In a fresh process that never imports llmlab: refused without remote code, the same logits with it."""
    import json
    import subprocess
    import sys

    model, tok = fresh()
    prune_llm_pruner(model, CALIB, LLMPrunerConfig(ratio=0.2, skip_first=1, skip_last=0))
    save_model(model, tok, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "llmlab_llama.LlmlabLlamaForCausalLM"
    assert (tmp_path / "m" / "llmlab_llama.py").is_file()
    torch.save(model(X).logits.detach(), tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.modules["llmlab"] = None  # llmlab must not be needed
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})
    raise SystemExit("loaded without trust_remote_code")
except (ValueError, EOFError, OSError):
    pass
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True)
x = torch.tensor({X.tolist()!r})
torch.testing.assert_close(model(x).logits, torch.load({str(tmp_path / 'expected.pt')!r}), rtol=0, atol=1e-5)
print("ok", type(model).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=300)
    assert done.returncode == 0 and "ok LlmlabLlamaForCausalLM" in done.stdout, done.stderr[-2000:]

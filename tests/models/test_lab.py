"""The lab decoder: parity with transformers' LLaMA (the built-in weights) and GPT-2, the position schemes
against their formulas, the KV cache against full forwards, MoE against the dense FFN and its losses
against their formulas, and the config's errors."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmlab.errors import LlmlabError
from llmlab.generation import SamplingConfig, generate
from llmlab.models import load_model, save_model
from llmlab.models.lab import LabConfig, LabForCausalLM
from llmlab.models.lab import positions as pos
from llmlab.models.lab.convert import from_gpt2, from_llama
from llmlab.models.lab.moe import MoE
from llmlab.models.tiny import byte_tokenizer, tiny_model


def lab(seed=0, **kw) -> LabForCausalLM:
    fields = dict(vocab_size=320, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=0, eos_token_id=2)
    fields.update(kw)
    torch.manual_seed(seed)
    return LabForCausalLM(LabConfig(**fields)).eval()


def test_llama_choices_load_the_builtin_weights_and_give_llamas_logits():
    llama, tok = load_model("smollm2-135m")
    ours = from_llama(llama)
    batch = tok(["The capital of France is Paris, and the capital of Italy", "Hello"], return_tensors="pt",
                padding=True)
    with torch.no_grad():
        want, got = llama(**batch).logits, ours(**batch).logits
    real = batch["attention_mask"].bool()
    assert (want - got)[real].abs().max() <= 1e-5
    assert type(AutoModelForCausalLM.from_config(ours.config)).__name__ == "LabForCausalLM"


def test_gpt2_choices_give_gpt2s_logits():
    gpt2, _ = tiny_model("tiny-gpt2")
    gpt2.eval()
    ours = from_gpt2(gpt2).eval()
    ids = torch.randint(0, 300, (3, 17))
    with torch.no_grad():
        assert (gpt2(ids).logits - ours(ids).logits).abs().max() <= 1e-5


def test_sinusoidal_equals_the_papers_formula():
    table = pos.sinusoidal(torch.arange(50), 16)
    for p in (0, 7, 49):
        for i in range(8):
            angle = p / 10000 ** (2 * i / 16)
            assert table[p, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def test_rope_rotates_each_pair_by_position_times_frequency():
    d, base = 8, 500.0
    x = torch.randn(1, 1, 6, d)
    p = torch.arange(6)[None]
    got = pos.apply_rope(x, *pos.rope_cos_sin(p, pos.rope_frequencies(d, base)))
    theta = base ** (-torch.arange(0, d, 2).float() / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones(6, d // 2), p[0, :, None] * theta)
    assert torch.allclose(got, torch.cat([z.real, z.imag], -1), atol=1e-5)
    # the point of RoPE: a query-key score depends on the positions' difference only
    q, k = torch.randn(d), torch.randn(d)
    def score(i, j):
        rot = lambda v, n: pos.apply_rope(v.view(1, 1, 1, d), *pos.rope_cos_sin(torch.tensor([[n]]), theta))  # noqa: E731
        return float((rot(q, i) * rot(k, j)).sum())
    assert score(9, 4) == pytest.approx(score(25, 20), abs=1e-4)


def test_alibi_slopes_are_the_papers_also_when_heads_are_not_a_power_of_two():
    assert pos.alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    # 6 heads: the 4-head slopes, then every other slope of the 8-head sequence
    assert pos.alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    bias = pos.alibi_bias(torch.tensor([0.5]), torch.arange(3), torch.arange(3))
    assert bias[0].tolist() == [[0, -0.5, -1], [-0.5, 0, -0.5], [-1, -0.5, 0]]


@pytest.mark.parametrize("kw", [
    dict(), dict(position="learned", norm="layernorm", ffn="gelu", bias=True), dict(position="sinusoidal", ffn="relu"),
    dict(position="alibi", num_attention_heads=6), dict(position="none", ffn="geglu"),
    dict(num_key_value_heads=1, qk_norm=True), dict(num_key_value_heads=2, norm_position="sandwich"),
    dict(norm_position="post", deepnorm=True), dict(num_experts=4, num_experts_per_tok=2)])
def test_cached_decoding_of_a_left_padded_batch_equals_each_row_alone(kw):
    model = lab(**kw)
    tok = byte_tokenizer()
    prompts = ["a much longer prompt than the other", "short"]
    got = generate(model, tok, prompts, SamplingConfig(max_new_tokens=6))
    assert got == [generate(model, tok, p, SamplingConfig(max_new_tokens=6)) for p in prompts]
    # and each step's cached logits equal a full forward over the whole sequence
    ids = tok(prompts[0], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids[:, :-3], use_cache=True)
        step = model(ids[:, -3:], cache=out.cache, use_cache=True).logits
        full = model(ids).logits[:, -3:]
    assert torch.allclose(step, full, atol=1e-5)


def test_transformers_generate_and_llmlabs_loop_agree():
    model, tok = lab(), byte_tokenizer()
    ids = tok("hello there", return_tensors="pt").input_ids
    hf = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, ids.shape[1]:]
    ours = generate(model, tok, "hello there", SamplingConfig(max_new_tokens=8, ignore_eos=True))
    assert tok.decode(hf) == ours


def test_prefix_lm_sees_the_whole_prefix_and_nothing_after_it():
    model = lab(attention="prefix")
    ids = torch.randint(3, 300, (1, 10))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 300
    n = torch.tensor([6])  # prefix = tokens 0..5
    with torch.no_grad():
        a, b = model(ids, prefix_lengths=n).logits, model(changed, prefix_lengths=n).logits
        c, d = model(ids).logits, model(changed).logits
    assert not torch.allclose(a[0, 2], b[0, 2])  # inside the prefix, token 2 sees token 5
    assert torch.allclose(c[0, 2], d[0, 2])      # causal: it does not
    causal = lab(attention="causal")
    with torch.no_grad():  # a causal decoder given prefix lengths (prefix-LM rows) stays causal
        assert torch.equal(causal(ids, prefix_lengths=n).logits, causal(ids).logits)
    later = changed.clone()
    later[0, 8] = (ids[0, 8] + 1) % 300
    with torch.no_grad():
        e = model(later, prefix_lengths=n).logits
    assert torch.allclose(b[0, :8], e[0, :8], atol=1e-6)  # nothing sees past the prefix ahead of itself
    with torch.no_grad():  # generating, the prompt is the prefix
        assert torch.allclose(model(ids, use_cache=True).logits, model(ids, prefix_lengths=torch.tensor([10])).logits)


def test_document_masking_keeps_documents_apart():
    model = lab(position="learned")
    ids = torch.randint(3, 300, (1, 12))
    segments = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = model(ids, segment_ids=segments).logits
        alone = model(ids[:, 5:]).logits
    # the second document alone, but its positions continue from 5: compare with positions restarting
    with torch.no_grad():
        restarted = model(ids, segment_ids=segments,
                          position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])).logits
    assert torch.allclose(restarted[:, 5:], alone, atol=1e-5)
    assert not torch.allclose(packed[:, 5:], alone, atol=1e-5)


def test_one_expert_top1_is_the_dense_ffn():
    dense = lab(seed=1)
    moe = lab(seed=2, num_experts=1, num_experts_per_tok=1)
    state = {k.replace("mlp.", "mlp.experts.0."): v for k, v in dense.state_dict().items()}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert all("router" in k for k in missing) and not unexpected
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, moe(ids).logits, atol=1e-6)


def test_balance_and_z_losses_equal_their_formulas_on_hand_made_router_outputs():
    cfg = LabConfig(vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=1, num_experts=4,
                    num_experts_per_tok=1, moe_aux_loss_coef=0.1, moe_z_loss_coef=0.01)
    moe = MoE(cfg, lambda: torch.nn.Identity())
    logits = torch.tensor([[2.0, 0, 0, 0], [0, 3.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 0.5]])
    probs = logits.softmax(-1)
    experts = probs.topk(1).indices
    f = torch.tensor([2, 1, 0, 1]) / 4  # tokens 0 and 2 go to expert 0, token 1 to 1, token 3 to 3
    P = probs.mean(0)
    want = 0.1 * 4 * (f * P).sum() + 0.01 * (torch.logsumexp(logits, -1) ** 2).mean()
    assert moe.losses(logits, probs, experts) == pytest.approx(float(want), rel=1e-6)


def test_capacity_drops_the_overflow_and_counts_it():
    cfg = LabConfig(vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=1, num_experts=2,
                    num_experts_per_tok=1, moe_capacity_factor=1.0)
    moe = MoE(cfg, lambda: torch.nn.Linear(4, 4))
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))  # every x₀ > 0 token → expert 0
        x = torch.tensor([[[1.0, 0, 0, 0], [2.0, 1, 0, 0], [3.0, 0, 1, 0], [-1.0, 0, 0, 1]]])
        y = moe(x)
    # capacity ⌈1·1·4/2⌉ = 2: the third token for expert 0 is dropped, its output is zero
    assert moe.stats == {"tokens": [2, 1], "dropped": 1}
    assert y[0, 2].abs().sum() == 0 and y[0, 0].abs().sum() > 0


def test_noisy_gating_is_noisy_only_in_training():
    model = lab(num_experts=4, num_experts_per_tok=1, moe_noisy_gating=True)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        torch.manual_seed(0)
        a = model(ids).logits
        torch.manual_seed(1)
        assert not torch.equal(a, model(ids).logits)


def test_gated_ffns_get_two_thirds_of_the_width_so_parameters_match():
    plain, gated = lab(ffn="gelu", hidden_size=96), lab(ffn="swiglu", hidden_size=96)
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if "mlp" in n)  # noqa: E731
    assert gated.config.intermediate_size == 256 and plain.config.intermediate_size == 384
    assert count(gated) == count(plain)


def test_deepnorm_and_scaled_init():
    deep = lab(norm_position="post", deepnorm=True, num_hidden_layers=6)
    assert deep.model.layers[0].alpha == pytest.approx(12 ** 0.25)
    beta = 48 ** -0.25
    w = deep.model.layers[0].mlp.down_proj.weight.detach()  # Xavier-normal with gain β
    assert float(w.std()) == pytest.approx(beta * math.sqrt(2 / sum(w.shape)), rel=0.1)
    gpt = lab(num_hidden_layers=6, hidden_size=96)
    assert float(gpt.model.layers[0].self_attn.o_proj.weight.std()) == pytest.approx(0.02 / math.sqrt(12), rel=0.1)
    assert float(gpt.model.layers[0].self_attn.q_proj.weight.std()) == pytest.approx(0.02, rel=0.1)


def test_a_dropped_layer_is_skipped_and_a_kept_one_rescaled():
    model = lab()
    model.train()
    ids = torch.randint(0, 300, (1, 6))
    model.model.layer_keep = [1.0, 1e-9]  # layer 1 is always dropped
    with torch.no_grad():
        dropped = model(ids).logits
        model.model.layer_keep = None
        model.model.layers = model.model.layers[:1]
        model.config.num_hidden_layers = 1
        assert torch.allclose(dropped, model(ids).logits, atol=1e-6)


def test_a_saved_lab_model_loads_back_everywhere(tmp_path):
    model, tok = lab(position="alibi"), byte_tokenizer()
    save_model(model, tok, tmp_path / "m")
    again, _ = load_model(str(tmp_path / "m"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
        assert torch.equal(model(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("kw, key", [
    (dict(hidden_size=50, num_attention_heads=4), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(deepnorm=True), "deepnorm"), (dict(num_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(norm="batchnorm"), "norm"), (dict(position="xpos"), "position")])
def test_inconsistent_configs_name_the_key(kw, key):
    with pytest.raises(LlmlabError, match=key):
        lab(**kw)


def test_activation_checkpointing_gives_the_same_gradients():
    model = lab()
    model.train()
    ids = torch.randint(0, 300, (2, 12))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert model.model.layers[0].gradient_checkpointing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, grads()))


def test_sinusoidal_positions_are_added_to_embeddings_scaled_by_root_d():
    model = lab(position="sinusoidal")
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        model(ids)
        want = model.model.embed_tokens(ids) * math.sqrt(48) + pos.sinusoidal(torch.arange(9), 48)
    assert torch.allclose(seen[0], want, atol=1e-6)

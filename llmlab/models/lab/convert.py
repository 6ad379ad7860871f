"""Bring a transformers LLaMA or GPT-2 into the lab decoder, weights and all.

With LLaMA's choices the lab's module names are LLaMA's, so the state dict loads as it is; GPT-2
keeps its attention in one fused `c_attn` of transformers' `Conv1D` (weights stored (in, out)),
which is split and transposed here. Both are how the parity tests show that the lab's blocks
compute what the originals do, and how continued pretraining starts from a published model.
"""

import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from llmlab.errors import LlmlabError
from llmlab.models.lab.config import LabConfig
from llmlab.models.lab.modeling import LabForCausalLM


def from_llama(model: LlamaForCausalLM) -> LabForCausalLM:
    c = model.config
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise LlmlabError(f"from_llama: RoPE scaling '{rope.get('rope_type')}' is not a lab decoder choice")
    config = LabConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings, norm="rmsnorm",
        norm_position="pre", ffn="swiglu", position="rope", rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_eps=c.rms_norm_eps, bias=bool(c.attention_bias), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    if c.hidden_act != "silu" or getattr(c, "mlp_bias", False):
        raise LlmlabError(f"from_llama: activation {c.hidden_act} / MLP bias are not LLaMA's SwiGLU")
    lab = _build(config, model)
    _load(lab, {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k})
    return lab


def from_gpt2(model: GPT2LMHeadModel) -> LabForCausalLM:
    c = model.config
    approximate = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(c.activation_function)
    if approximate is None:
        raise LlmlabError(f"from_gpt2: activation '{c.activation_function}' is not a lab decoder choice")
    config = LabConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        intermediate_size=c.n_inner or 4 * c.n_embd, max_position_embeddings=c.n_positions, norm="layernorm",
        norm_position="pre", ffn="gelu", gelu_approximate=approximate, position="learned", bias=True,
        norm_eps=c.layer_norm_epsilon, tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    sd, out = model.state_dict(), {}
    out["model.embed_tokens.weight"] = sd["transformer.wte.weight"]
    out["model.embed_positions.weight"] = sd["transformer.wpe.weight"]
    out["model.norm.weight"], out["model.norm.bias"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
    out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layer):
        g, lab = f"transformer.h.{i}.", f"model.layers.{i}."
        for gpt, ours in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[lab + ours + ".weight"], out[lab + ours + ".bias"] = sd[g + gpt + ".weight"], sd[g + gpt + ".bias"]
        qkv_w, qkv_b = sd[g + "attn.c_attn.weight"].t().chunk(3, dim=0), sd[g + "attn.c_attn.bias"].chunk(3)
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), qkv_w, qkv_b):
            out[lab + f"self_attn.{name}.weight"], out[lab + f"self_attn.{name}.bias"] = w, b
        moved = (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj"))
        for gpt, ours in moved:
            out[lab + ours + ".weight"], out[lab + ours + ".bias"] = sd[g + gpt + ".weight"].t(), sd[g + gpt + ".bias"]
    lab = _build(config, model)
    _load(lab, out)
    return lab


def t5_config(config: LabConfig):
    """The encoder-decoder of the survey's three-way comparison (causal decoder, prefix decoder, encoder-decoder),
    as transformers' T5 at the lab config's sizes: `num_hidden_layers` layers in the encoder and as many in the
    decoder. T5 brings its own choices: pre-RMSNorm and relative position buckets."""
    from transformers import T5Config

    ffn = {"swiglu": "gated-silu", "geglu": "gated-gelu", "gelu": "gelu", "relu": "relu"}[config.ffn]
    return T5Config(vocab_size=config.vocab_size, d_model=config.hidden_size, d_kv=config.head_dim,
                    d_ff=config.intermediate_size, num_layers=config.num_hidden_layers,
                    num_heads=config.num_attention_heads, dropout_rate=config.dropout,
                    layer_norm_epsilon=config.norm_eps,
                    feed_forward_proj=ffn, tie_word_embeddings=config.tie_word_embeddings,
                    pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
                    decoder_start_token_id=config.pad_token_id)


def _build(config: LabConfig, like) -> LabForCausalLM:
    p = next(like.parameters())
    with torch.device("meta"):
        lab = LabForCausalLM(config)
    return lab.to_empty(device=p.device).to(p.dtype)


def _load(lab: LabForCausalLM, state: dict):
    state = {k: v.contiguous() for k, v in state.items()}
    missing, unexpected = lab.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not lab.config.tie_word_embeddings]
    if missing or unexpected:
        raise LlmlabError(f"weights do not fit the lab decoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    lab.tie_weights()
    lab._init_weights(lab.model)  # to_empty left the non-persistent RoPE/ALiBi buffers empty: compute them again

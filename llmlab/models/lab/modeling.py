"""llmlab's configurable decoder: one transformer block whose every part is a config choice.

    x₀ = E[ids] (+ P[pos] for learned/sinusoidal positions)
    pre-LN    x ← x + Attn(N₁(x));          x ← x + FFN(N₂(x))           (GPT-2, LLaMA)
    post-LN   x ← N₁(α·x + Attn(x));        x ← N₂(α·x + FFN(x))         (the 2017 Transformer; α > 1: DeepNorm)
    sandwich  x ← x + N₁'(Attn(N₁(x)));     x ← x + N₂'(FFN(N₂(x)))      (CogView)
    logits = N_f(x) Wᵀ                      (no final norm after post-LN blocks)

Module names follow transformers' LLaMA (`model.embed_tokens`, `model.layers.i.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, …), so with LLaMA's choices a LLaMA checkpoint's state dict
loads as it is, and llmlab's compression, PEFT and surgery code finds the linears it expects.
The KV cache is transformers' `DynamicCache`, so llmlab's decoding loop and `generate` both work.
"""

import math
import random

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from llmlab.models.lab import positions as pos
from llmlab.models.lab.config import MODEL_TYPE, LabConfig
from llmlab.models.lab.moe import MoE


class RMSNorm(nn.Module):
    """x / √(mean(x²) + ε) · g, computed in float32 (as LLaMA does, so the parity is exact)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: LabConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    """Gated: down(act(gate(x)) ⊙ up(x)) (SwiGLU: SiLU, GeGLU: GeLU). Plain: down(act(up(x)))."""

    def __init__(self, config: LabConfig):
        super().__init__()
        d, width = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, width, bias=config.bias) if config.gated else None
        self.up_proj = nn.Linear(d, width, bias=config.bias)
        self.down_proj = nn.Linear(width, d, bias=config.bias)
        self.down_proj.writes_residual = True  # what the init scales (see LabPreTrainedModel._init_weights)
        for linear in (self.gate_proj, self.up_proj, self.down_proj):
            if linear is not None:
                linear.deepnorm_scaled = True
        self.act = {"swiglu": F.silu, "relu": F.relu}.get(
            config.ffn, lambda h: F.gelu(h, approximate=config.gelu_approximate))

    def forward(self, x):
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gate_proj is not None else self.act(self.up_proj(x))
        return self.down_proj(h)


class Attention(nn.Module):
    """Multi-head attention with `num_key_value_heads` shared KV heads (MHA, GQA, MQA) through SDPA."""

    def __init__(self, config: LabConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.h, self.kv, self.d = (layer_idx, config.num_attention_heads, config.num_key_value_heads,
                                                   config.head_dim)
        self.dropout = config.dropout
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.h * self.d, bias=config.bias)
        self.k_proj = nn.Linear(d, self.kv * self.d, bias=config.bias)
        self.v_proj = nn.Linear(d, self.kv * self.d, bias=config.bias)
        self.o_proj = nn.Linear(self.h * self.d, d, bias=config.bias)
        self.o_proj.writes_residual = self.v_proj.deepnorm_scaled = self.o_proj.deepnorm_scaled = True
        self.q_norm = RMSNorm(self.d, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.d, config.norm_eps) if config.qk_norm else None

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = pos.apply_rope(q, *rope), pos.apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        causal = mask is None and T > 1 and k.shape[2] == T  # the fast path: no padding, no cache, no bias
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                                           is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.kv != self.h)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.h * self.d))


class Block(GradientCheckpointingLayer):
    def __init__(self, config: LabConfig, layer_idx: int):
        super().__init__()
        self.placement = config.norm_position
        self.alpha = (2 * config.num_hidden_layers) ** 0.25 if config.deepnorm else 1.0  # DeepNet, decoder-only
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MoE(config, lambda: MLP(config)) if config.num_experts else MLP(config)
        self.input_layernorm, self.post_attention_layernorm = make_norm(config), make_norm(config)
        if self.placement == "sandwich":
            self.attn_out_norm, self.mlp_out_norm = make_norm(config), make_norm(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, mask=None, cache=None, scale: float = 1.0):
        """`scale` multiplies both residual branches: 1/p for a layer kept with probability p (layer dropping)."""
        attn = lambda h: self.drop(self.self_attn(h, rope, mask, cache)) * scale  # noqa: E731
        ffn = lambda h: self.drop(self.mlp(h)) * scale  # noqa: E731
        if self.placement == "pre":
            x = x + attn(self.input_layernorm(x))
            return x + ffn(self.post_attention_layernorm(x))
        if self.placement == "post":
            x = self.input_layernorm(self.alpha * x + attn(x))
            return self.post_attention_layernorm(self.alpha * x + ffn(x))
        x = x + self.attn_out_norm(attn(self.input_layernorm(x)))
        return x + self.mlp_out_norm(ffn(self.post_attention_layernorm(x)))


class LabPreTrainedModel(PreTrainedModel):
    config_class = LabConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """N(0, σ²) linears and embeddings, zero biases, unit norms; GPT-2's 1/√(2L) on the projections that
        write into the residual stream; DeepNorm's β on the FFN, value and output projections."""
        c, std = self.config, self.config.initializer_range
        if isinstance(module, nn.Linear):
            if c.deepnorm and getattr(module, "deepnorm_scaled", False):  # β = (8N)^(-1/4), Xavier-normal as DeepNet
                init.xavier_normal_(module.weight, gain=(8 * c.num_hidden_layers) ** -0.25)
            elif c.scaled_init and getattr(module, "writes_residual", False):
                init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * c.num_hidden_layers))
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LabModel):  # buffers: from_pretrained builds them on the meta device
            init.copy_(module.inv_freq, pos.rope_frequencies(c.head_dim, c.rope_theta))
            init.copy_(module.alibi_slopes, pos.alibi_slopes(c.num_attention_heads))


class LabModel(LabPreTrainedModel):
    def __init__(self, config: LabConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                if config.position == "learned" else None)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config) if config.norm_position != "post" else None
        self.register_buffer("inv_freq", pos.rope_frequencies(config.head_dim, config.rope_theta), persistent=False)
        self.register_buffer("alibi_slopes", pos.alibi_slopes(config.num_attention_heads), persistent=False)
        self.layer_keep: list[float] | None = None  # progressive layer dropping sets this during training
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, prefix_lengths=None, segment_ids=None, **kwargs):
        c = self.config
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = _positions(attention_mask, past, T, x.device)
        if c.position == "learned":
            x = x + self.embed_positions(position_ids)
        elif c.position == "sinusoidal":  # the paper scales the embeddings by √d, else the ±1 waves drown them
            x = x * math.sqrt(c.hidden_size) + pos.sinusoidal(position_ids, c.hidden_size).to(x.dtype)
        rope = pos.rope_cos_sin(position_ids, self.inv_freq) if c.position == "rope" else None
        mask = self.attention_mask(attention_mask, past, T, prefix_lengths, segment_ids, x.device)
        x = self.drop(x)
        for i, layer in enumerate(self.layers):
            keep = self.layer_keep[i] if self.layer_keep is not None and self.training else 1.0
            if keep < 1.0 and random.random() >= keep:
                continue  # a dropped layer costs nothing: no forward, no backward
            x = layer(x, rope, mask, cache, 1.0 / keep)
        if self.norm is not None:
            x = self.norm(x)
        return x, cache

    def attention_mask(self, attention_mask, past, T, prefix_lengths, segment_ids, device):
        """(B, H or 1, T, past+T) additive mask, or None when plain causal attention is all there is.

        Allowed: key j ≤ query i (causal), or both inside the row's prefix (prefix LM), and within
        one segment (document masking); padding keys never. A padded query sees itself so that
        its softmax is defined. ALiBi adds −m_h·|i − j| to what is allowed.
        """
        alibi = self.config.position == "alibi"
        padded = attention_mask is not None and not bool(attention_mask.all())
        chunk_after_cache = past > 0 and T > 1  # SDPA's is_causal aligns top-left: wrong after a cache
        prefix = prefix_lengths is not None and self.config.attention == "prefix"
        if not (padded or alibi or chunk_after_cache or prefix or segment_ids is not None):
            return None
        qi = torch.arange(past, past + T, device=device)
        kj = torch.arange(past + T, device=device)
        allowed = (kj[None, :] <= qi[:, None])[None]  # (1, T, S)
        if prefix:  # a causal decoder ignores prefix lengths
            n = prefix_lengths.to(device)[:, None, None]
            allowed = allowed | ((qi[None, :, None] < n) & (kj[None, None, :] < n))
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :].bool()
        allowed = (allowed | (kj[None, None, :] == qi[None, :, None]))[:, None]  # (B, 1, T, S)
        bias = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
        if alibi:
            bias = bias + pos.alibi_bias(self.alibi_slopes, qi, kj)[None]
        return bias


def _positions(attention_mask, past: int, T: int, device) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded row starts at 0 like an unpadded one."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None]
    counted = attention_mask.long().cumsum(-1) - 1
    return counted.clamp(min=0)[:, -T:]


def _prompt_lengths(input_ids) -> torch.Tensor:
    """A prefix LM's prefix when it generates: the whole prompt (the prefill of a decoding loop, which asks
    for a cache). Left padding sits at the start, so the prompt's last index is the row's full length."""
    return torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)


class LabForCausalLM(LabPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LabConfig):
        super().__init__(config)
        self.model = LabModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # found once, not on every forward (decoding runs one per token); a plain list, so not registered twice
        self._moe_layers = [m for m in self.modules() if isinstance(m, MoE)]

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, prefix_lengths=None, segment_ids=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if (self.config.attention == "prefix" and prefix_lengths is None and use_cache is True and input_ids is not None
                and input_ids.shape[1] > 1 and (cache is None or cache.get_seq_length() == 0)):
            prefix_lengths = _prompt_lengths(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        for moe in self.moe_layers():
            moe.reset()  # a layer dropped in this pass must not hand on the last pass's losses
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                   use_cache and not self.training, prefix_lengths, segment_ids)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        aux = self.aux_loss()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            loss = loss + aux if aux is not None else loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits, cache=cache)

    def aux_loss(self) -> torch.Tensor | None:
        """The MoE layers' load-balancing and z-losses from the last forward, summed; None for a dense model."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return sum(losses) if losses else None

    def moe_layers(self) -> list[MoE]:
        return self._moe_layers


AutoConfig.register(MODEL_TYPE, LabConfig, exist_ok=True)
AutoModelForCausalLM.register(LabConfig, LabForCausalLM, exist_ok=True)

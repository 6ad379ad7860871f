"""`llmlab_llama`: a LLaMA whose decoder layers may differ in width, as one more transformers model.

LlamaConfig has one intermediate_size, num_attention_heads and num_key_value_heads for all layers,
so a model pruned harder in its middle layers than in its first and last ones (LLM-Pruner's
recipe) cannot be written as one. This config adds a list per layer,

    layer_intermediate_sizes[i]     FFN channels of layer i
    layer_num_attention_heads[i]    query heads of layer i
    layer_num_key_value_heads[i]    KV heads of layer i, dividing its query heads (GQA: n_rep = heads / kv)

and the model is transformers' LlamaForCausalLM with each layer's q/k/v/o and gate/up/down linears
built at those sizes. Nothing else changes, which is why this file is short: LlamaAttention
reshapes with -1 heads, repeats KV heads by the module's own `num_key_value_groups` (set per layer
here), and the KV cache stores whatever shape each layer's keys have. `head_dim` is shared and
explicit; the top-level intermediate_size / num_attention_heads / num_key_value_heads are the
widest layer's, for code that reads them as upper bounds.

Importing llmlab.models registers the pair with AutoConfig and AutoModelForCausalLM, so a saved
folder loads with `load_model(folder)`, or `AutoModelForCausalLM.from_pretrained(folder)` after
`import llmlab.models`, and trains, merges and generates like any LLaMA.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

MODEL_TYPE = "llmlab_llama"


@strict
class LlmlabLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE

    layer_intermediate_sizes: list[int] | None = None
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers  # a list left out means every layer has the top-level size
        self.layer_intermediate_sizes = list(self.layer_intermediate_sizes or [self.intermediate_size] * n)
        self.layer_num_attention_heads = list(self.layer_num_attention_heads or [self.num_attention_heads] * n)
        self.layer_num_key_value_heads = list(self.layer_num_key_value_heads or [self.num_key_value_heads] * n)

    def validate_architecture(self):
        """Replaces LLaMA's hidden_size % num_attention_heads check: head_dim is explicit, so any head count works."""
        lists = (self.layer_intermediate_sizes, self.layer_num_attention_heads, self.layer_num_key_value_heads)
        if any(len(values) != self.num_hidden_layers for values in lists):
            raise ValueError(f"llmlab_llama needs one intermediate size, head count and KV head count per layer "
                             f"({self.num_hidden_layers}), got {[len(v) for v in lists]}")
        for i, (heads, kv) in enumerate(zip(self.layer_num_attention_heads, self.layer_num_key_value_heads)):
            if kv < 1 or heads % kv:
                raise ValueError(f"llmlab_llama layer {i}: {heads} query heads cannot share {kv} KV heads")

    def layer_sizes(self, i: int) -> tuple[int, int, int]:
        """(query heads, KV heads, FFN channels) of layer i."""
        return self.layer_num_attention_heads[i], self.layer_num_key_value_heads[i], self.layer_intermediate_sizes[i]


class LlmlabLlamaForCausalLM(LlamaForCausalLM):
    config_class = LlmlabLlamaConfig

    def __init__(self, config: LlmlabLlamaConfig):
        # The dense stack is built, then resized: from_pretrained builds on the meta device, so this
        # costs nothing there, and every module keeps the one shared config object.
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            resize_layer(layer, *config.layer_sizes(i), config.head_dim)
        self.post_init()  # initialises the new linears like the others (from_config)


def resize_layer(layer, heads: int, kv: int, ffn: int, head_dim: int) -> None:
    """Give a LlamaDecoderLayer fresh linears for `heads` query heads, `kv` KV heads and `ffn` channels."""
    a, m = layer.self_attn, layer.mlp
    hidden = a.q_proj.in_features
    a.q_proj, a.k_proj, a.v_proj = (_like(a.q_proj, hidden, heads * head_dim), _like(a.k_proj, hidden, kv * head_dim),
                                    _like(a.v_proj, hidden, kv * head_dim))
    a.o_proj = _like(a.o_proj, heads * head_dim, hidden)
    a.num_key_value_groups = heads // kv  # what repeat_kv uses: per layer, not the config's
    m.gate_proj, m.up_proj = _like(m.gate_proj, hidden, ffn), _like(m.up_proj, hidden, ffn)
    m.down_proj = _like(m.down_proj, ffn, hidden)
    m.intermediate_size = ffn


def _like(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised nn.Linear of the new shape, with `linear`'s bias, device and dtype."""
    w = linear.weight
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, device=w.device, dtype=w.dtype)


def as_llmlab_llama(model: LlamaForCausalLM) -> LlmlabLlamaForCausalLM:
    """Relabel, in place, a LLaMA whose layers were resized (by a pruner) as llmlab_llama, sizes read from its linears.

    The weights stay where they are; only the config (shared by every module) and the class change,
    so that save_pretrained writes a folder AutoModelForCausalLM rebuilds at the same sizes.
    """
    old = model.config
    d = old.head_dim
    layers = model.model.layers
    heads = [layer.self_attn.q_proj.out_features // d for layer in layers]
    kv = [layer.self_attn.k_proj.out_features // d for layer in layers]
    ffn = [layer.mlp.gate_proj.out_features for layer in layers]
    fields = {**old.to_dict(), "model_type": MODEL_TYPE, "intermediate_size": max(ffn),
              "num_attention_heads": max(heads), "num_key_value_heads": max(kv), "layer_intermediate_sizes": ffn,
              "layer_num_attention_heads": heads, "layer_num_key_value_heads": kv}
    config = LlmlabLlamaConfig.from_dict(fields)
    config._attn_implementation = old._attn_implementation
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = config
    model.__class__ = LlmlabLlamaForCausalLM  # same modules and forward; save_pretrained names this class
    return model


AutoConfig.register(MODEL_TYPE, LlmlabLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(LlmlabLlamaConfig, LlmlabLlamaForCausalLM, exist_ok=True)
# save_pretrained copies this file beside config.json and names it in `auto_map`, so transformers alone
# (trust_remote_code=True, no llmlab installed) rebuilds a pruned folder: the file needs only transformers.
LlmlabLlamaConfig.register_for_auto_class()
LlmlabLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

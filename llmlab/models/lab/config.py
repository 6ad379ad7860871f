"""`LabConfig`: every architecture choice of llmlab's configurable decoder, as one transformers config.

It is a `PreTrainedConfig`, registered with `AutoConfig` as model_type "llmlab_lab", so a folder the
lab writes is a standard HF folder (config.json + safetensors) that every llmlab verb and
`AutoModelForCausalLM.from_pretrained` reads. The defaults are LLaMA's choices; GPT-2's are

    LabConfig(norm="layernorm", ffn="gelu", position="learned", bias=True, gelu_approximate="tanh")

A choice that cannot work (heads not dividing the width, DeepNorm with pre-LN, top-k above the
experts) fails at construction with an LlmlabError naming the key and the fix.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from llmlab.errors import LlmlabError
from llmlab.models.lab.positions import KINDS as POSITIONS

MODEL_TYPE = "llmlab_lab"
NORMS = ("rmsnorm", "layernorm")
PLACEMENTS = ("pre", "post", "sandwich")
FFNS = ("swiglu", "geglu", "gelu", "relu")
MASKS = ("causal", "prefix")


@strict
class LabConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None     # None: as many as query heads (MHA); 1: MQA; between: GQA
    head_dim: int | None = None                # None: hidden_size / num_attention_heads
    intermediate_size: int | None = None       # None: 4·hidden, or 2/3 of that for gated FFNs (equal parameters)
    max_position_embeddings: int = 2048
    norm: str = "rmsnorm"                      # rmsnorm | layernorm
    norm_position: str = "pre"                 # pre | post | sandwich
    deepnorm: bool = False                     # post-LN with residual ×α and init ×β (Wang et al. 2022)
    norm_eps: float = 1e-5
    ffn: str = "swiglu"                        # swiglu | geglu | gelu | relu
    gelu_approximate: str = "none"             # none (erf, nanoGPT) | tanh (GPT-2's gelu_new)
    position: str = "rope"                     # learned | sinusoidal | rope | alibi | none
    rope_theta: float = 10000.0
    qk_norm: bool = False                      # normalise queries and keys per head before the dot product
    bias: bool = False                         # biases in linears (and LayerNorm), as GPT-2 has
    attention: str = "causal"                  # causal | prefix (bidirectional over each row's prefix)
    dropout: float = 0.0
    initializer_range: float = 0.02
    scaled_init: bool = True                   # output projections ~ N(0, (0.02/√(2L))²), GPT-2's init
    num_experts: int = 0                       # 0: dense FFN; N: a Mixture-of-Experts FFN in every layer
    num_experts_per_tok: int = 2               # top-k
    moe_noisy_gating: bool = False             # Shazeer et al.'s noisy top-k gating (training only)
    moe_capacity_factor: float | None = None   # None: no token dropped; c: each expert takes ≤ c·k·T/N tokens
    moe_aux_loss_coef: float = 0.01            # α of the Switch load-balancing loss
    moe_z_loss_coef: float = 0.001             # router z-loss (ST-MoE)
    use_cache: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            width = 4 * self.hidden_size
            self.intermediate_size = width if self.ffn in ("gelu", "relu") else _round_up(2 * width // 3, 8)
        super().__post_init__(**kwargs)
        self.check()

    def validate_architecture(self):
        """transformers' own check; llmlab's checks are in `check`, with fixes in their messages."""

    def check(self):
        _choice("norm", self.norm, NORMS)
        _choice("norm_position", self.norm_position, PLACEMENTS)
        _choice("ffn", self.ffn, FFNS)
        _choice("position", self.position, POSITIONS)
        _choice("attention", self.attention, MASKS)
        _choice("gelu_approximate", self.gelu_approximate, ("none", "tanh"))
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise LlmlabError(f"model config: {key} must be at least 1, got {getattr(self, key)}")
        if self.head_dim is None:
            raise LlmlabError(f"model config: num_attention_heads={self.num_attention_heads} does not divide "
                              f"hidden_size={self.hidden_size}; pick a head count that divides it or set head_dim")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise LlmlabError(f"model config: num_key_value_heads={self.num_key_value_heads} must divide "
                              f"num_attention_heads={self.num_attention_heads} (1 = MQA, equal = MHA)")
        if self.position == "rope" and self.head_dim % 2:
            raise LlmlabError(f"model config: RoPE rotates pairs of channels, so head_dim must be even, "
                              f"got {self.head_dim}")
        if self.position == "sinusoidal" and self.hidden_size % 2:
            raise LlmlabError(f"model config: sinusoidal positions need an even hidden_size, got {self.hidden_size}")
        if self.deepnorm and self.norm_position != "post":
            raise LlmlabError(f"model config: deepnorm is a post-LN scheme; set norm_position=post "
                              f"(got {self.norm_position}) or deepnorm=false")
        if self.num_experts < 0:
            raise LlmlabError(f"model config: num_experts must be 0 (dense) or more, got {self.num_experts}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise LlmlabError(f"model config: num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                              f"num_experts={self.num_experts}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise LlmlabError(f"model config: moe_capacity_factor must be positive (or null: no dropping), "
                              f"got {self.moe_capacity_factor}")
        if not 0 <= self.dropout < 1:
            raise LlmlabError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    @property
    def gated(self) -> bool:
        return self.ffn in ("swiglu", "geglu")


def _choice(key: str, value: str, options) -> None:
    if value not in options:
        raise LlmlabError(f"model config: unknown {key} '{value}'; use one of {', '.join(options)}")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple

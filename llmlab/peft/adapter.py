"""Bottleneck adapters, in series (Houlsby et al., 2019) or in parallel (He et al., 2022).

Parameter-Efficient Transfer Learning for NLP, https://arxiv.org/abs/1902.00751
Towards a Unified View of Parameter-Efficient Transfer Learning, https://arxiv.org/abs/2110.04366

A bottleneck maps the hidden size d down to `size`, applies a nonlinearity, and maps back:

    Δ(z) = s · W_up f(W_down z + b_down) + b_up,    W_down ∈ R^{size×d}, W_up ∈ R^{d×size} (zeros)

Where it sits in a transformer block with sublayer F (attention or feed-forward) and block input x:

    series (Houlsby):   h = y + Δ(y),   y = F(x)     the adapter transforms the sublayer's output
    parallel (He et al.): h = y + Δ(x)               the adapter runs beside the sublayer, from its input

then the residual add. Both attach to the sublayer's output projection (LLaMA's o_proj and
down_proj, GPT-2's attn.c_proj and mlp.c_proj, …: targets.yaml, table "adapter"), because y is
exactly that projection's output: Houlsby apply the adapter "to the output of each sub-layer,
after the projection back to the input size, but before adding the skip connection back". Where
the model applies dropout to the sublayer output (GPT-2, OPT), the adapter runs just before it
rather than after; the two agree in eval mode.

The parallel adapter's x is the *block's* input — the normalised hidden state entering the
attention or feed-forward module, as in He et al.'s code — not the output projection's own input
(the attention heads' or the FFN's intermediate activations). The layer reads it with a forward
pre-hook on the projection's parent module, so it adds nothing to module names and composes with
other adapters on the same layers. OPT's fc2 sits directly in its decoder layer (its feed-forward
block is no module of its own), so a parallel adapter there is refused.

W_up and b_up start at zero, so training starts from the base model exactly. He et al. scale
the parallel adapter at the FFN by s = 4; Houlsby use s = 1. The nonlinearity means an adapter
cannot be folded into the base weights: it adds a little latency at inference.
"""

from dataclasses import dataclass
from typing import Literal

from torch import nn

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers
from llmlab.models.surgery import linear_shape
from llmlab.peft.base import DEFAULT, AdapterLayer, Method, mark_trainable, set_adapter
from llmlab.peft.targets import default_targets, find_targets, wrap_targets

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class AdapterConfig:
    size: int = field(64, help="bottleneck width: the down-projection maps the hidden size to this")
    activation: Literal["relu", "gelu", "silu", "tanh"] = field("relu", help="nonlinearity in the bottleneck")
    placement: Literal["series", "parallel"] = field(
        "series", help="series: transform each sublayer's output (Houlsby); parallel: run beside each "
                       "sublayer from its input (He et al.)")
    scaling: float = field(1.0, help="multiplies the adapter's output (He et al. use 4 for parallel adapters)")
    dropout: float = field(0.0, help="dropout on the bottleneck activations")
    targets: list[str] = field([], help="the sublayers' output projections to adapt (default per architecture: "
                                        "attention output and FFN down projection, e.g. o_proj,down_proj)")
    regex: str | None = field(None, help="adapt the modules whose full name matches this regex instead")

    def __post_init__(self):
        if self.size <= 0:
            raise LlmlabError(f"adapter size must be a positive integer, got {self.size}")
        if self.activation not in ACTIVATIONS:
            raise LlmlabError(f"adapter activation must be one of {', '.join(ACTIVATIONS)}, got '{self.activation}'")
        if self.placement not in ("series", "parallel"):
            raise LlmlabError(f"adapter placement must be series or parallel, got '{self.placement}'")
        if not 0 <= self.dropout < 1:
            raise LlmlabError(f"adapter dropout must be in [0, 1), got {self.dropout}")


class Bottleneck(nn.Module):
    """One adapter's down- and up-projection for one layer: Δ(z) = s · up(f(down(z)))."""

    def __init__(self, in_features: int, out_features: int, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.down = nn.Linear(in_features, cfg.size)  # default nn.Linear init (Kaiming-uniform)
        self.act = ACTIVATIONS[cfg.activation]()
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.up = nn.Linear(cfg.size, out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z):
        return self.up(self.dropout(self.act(self.down(z)))) * self.cfg.scaling


class AdapterLinear(AdapterLayer):
    """A sublayer's output projection with bottleneck adapters on its output."""

    method = "adapter"
    peft_keys = {"down.weight": "adapter_down.weight", "down.bias": "adapter_down.bias",
                 "up.weight": "adapter_up.weight", "up.bias": "adapter_up.bias"}

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.block_input = None  # (B, T, d), set by the parent module's pre-hook for parallel adapters
        self.hooked = False

    def forward(self, x):
        y = self.base_layer(x)                    # (B, T, d): the sublayer's output before the residual add
        block_input, self.block_input = self.block_input, None  # used once: don't keep activations alive
        for name in self.running():
            adapter = self.adapters[name]
            z = y if adapter.cfg.placement == "series" else self._checked(block_input)
            y = y + adapter(z.to(adapter.up.weight.dtype)).to(y.dtype)
        return y

    def keep_input(self, module, args, kwargs):
        """Forward pre-hook on the parent module: remember the block's input for parallel adapters."""
        if any(self.adapters[n].cfg.placement == "parallel" for n in self.running()):
            self.block_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _checked(self, block_input):
        if block_input is None:
            raise LlmlabError("a parallel adapter's layer ran without its block: it reads the input of the "
                              "module holding the layer, so run the whole model or decoder layer")
        return block_input

    def merge(self, name: str):
        raise LlmlabError("bottleneck adapters cannot be merged into the base weights (their activation is "
                          "nonlinear); keep the adapter loaded, or train lora, dora or ia3 to merge")


def apply_adapter(model: nn.Module, cfg: AdapterConfig | None = None, name: str = DEFAULT) -> nn.Module:
    """Add bottleneck adapter `name` to the targeted layers, make it active and the only trainable part."""
    cfg = cfg or AdapterConfig()
    if cfg.placement == "parallel":
        _check_blocks(model, cfg)  # before wrapping anything: a refused adapter leaves the model as it was
    d_block = _hidden_size(model)
    paths = wrap_targets(model, cfg, name, AdapterLinear, lambda layer: _bottleneck(layer, cfg, d_block),
                         table="adapter")
    if cfg.placement == "parallel":
        for path in paths:
            _hook_parent(model, path)
    set_adapter(model, name)
    mark_trainable(model, name)
    return model


def _bottleneck(layer: nn.Module, cfg: AdapterConfig, d_block: int | None) -> Bottleneck:
    _, out_features = linear_shape(layer)
    # series reads the layer's output; parallel reads the block's input, the residual stream's width
    in_features = out_features if cfg.placement == "series" else (d_block or out_features)
    return Bottleneck(in_features, out_features, cfg)


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "hidden_size", None)


def _check_blocks(model: nn.Module, cfg: AdapterConfig):
    """Refuse layers whose parent is a whole decoder layer: its input is not the sublayer's input."""
    if getattr(model, "config", None) is None:
        return
    blocks = {id(block) for block in decoder_layers(model)}
    targets = cfg.targets or ([] if cfg.regex else default_targets(model, "adapter"))
    for path in find_targets(model, targets, cfg.regex):
        parent_path = path.rpartition(".")[0]
        if id(model.get_submodule(parent_path)) in blocks:
            raise LlmlabError(f"a parallel adapter reads the input of the module holding its layer, but {path} "
                              f"sits directly in decoder layer {parent_path} (its sublayer is no module of its "
                              f"own); target other layers (e.g. --adapter.targets out_proj) or use placement series")


def _hook_parent(model: nn.Module, path: str):
    """Let the layer at `path` see its parent module's input: the attention or feed-forward input."""
    layer = model.get_submodule(path)
    if not layer.hooked:
        parent = model.get_submodule(path.rpartition(".")[0])
        # a bound method, so that copy.deepcopy(model) points the copy's hook at the copy's layer
        parent.register_forward_pre_hook(layer.keep_input, with_kwargs=True)
        layer.hooked = True


METHOD = Method(AdapterConfig, apply_adapter)  # peft has no bottleneck adapters: llmlab's own format

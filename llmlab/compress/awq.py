"""AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration (Lin et al. 2023).

https://arxiv.org/abs/2306.00978 — reference code: https://github.com/mit-han-lab/llm-awq

A few input channels meet much larger activations than the rest, and the weights they multiply
matter most. Instead of keeping those weights in float, AWQ scales every input channel by s before
round-to-nearest quantization and divides the activations by s, an identity in float arithmetic:

    Y = X Wᵀ = (X diag(s)⁻¹) (W diag(s))ᵀ  ≈  (X diag(s)⁻¹) Q(W diag(s))ᵀ

A large s_j shrinks channel j's relative rounding error (the group's step barely moves). The scale
is a power of the channels' mean activation magnitude, its exponent found by grid search (§3.3):

    s = s_X^α / √(max s_X^α · min s_X^α),   s_X = mean |x| per input channel
    α* = argmin_{α ∈ {0, 1/grid, …}} ‖X Wᵀ − (X diag(s)⁻¹) Q(W diag(s))ᵀ‖²

α = 0 is plain RTN, so the search never does worse than RTN on the calibration data. diag(s)⁻¹ is
folded into the op that produces X — the RMSNorm/LayerNorm weight, or the rows of the previous
linear — so the float model computes the same function before quantization.

Differences from the reference, kept simple on purpose:
- The loss is the output error of the group's linears, summed, computed from XᵀX (with
  ΔW = W − Q(W diag(s)) diag(s)⁻¹ the error is tr(ΔW · XᵀX · ΔWᵀ)); the reference measures the
  whole attention or MLP block's output, which needs every activation kept in memory.
- No weight-clipping search (the reference's second step, `auto_clip`).
- Layer ℓ+1 is calibrated on the outputs of the already quantized layer ℓ (the shared scaffold);
  the reference feeds it the float outputs.
Supported: LLaMA-style blocks (LLaMA, Mistral, Qwen2), including grouped-query attention, where the
v_proj → o_proj scale is shared by the query heads that read one key/value head.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmlab.compress.calibrate import calibrate_layers, check_skip, layers_prefix, linears_of, observe, skipped
from llmlab.compress.rtn import RTNConfig, rtn_targets
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers
from llmlab.models.packed.qlinear import QuantLinear
from llmlab.models.packed.quant import QuantSpec, fake_quantize
from llmlab.models.surgery import set_module

# (the op producing the input, the linears reading it) in a LLaMA-style block.
LLAMA_GROUPS = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("self_attn.v_proj", ["self_attn.o_proj"]),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("mlp.up_proj", ["mlp.down_proj"]),
]


@dataclass
class AWQConfig:
    bits: int = field(4, help="bits per weight, 2 to 8")
    group_size: int = field(128, help="input columns per quantization group; 0 per output channel, -1 per tensor")
    symmetric: bool = field(False, help="symmetric grid (zero point in the middle) instead of min/max")
    grid: int = field(20, help="number of exponents alpha tried in [0, 1)")
    skip: list[str] = field([], help="regexes of full module names to leave in float")
    batch_size: int = field(8, help="calibration sequences per forward pass")

    def __post_init__(self):
        QuantSpec(self.bits, self.group_size, self.symmetric)  # validates bits and group_size
        if self.grid < 1:
            raise LlmlabError(f"awq grid must be a positive integer (exponents tried), got {self.grid}")
        if self.batch_size < 1:
            raise LlmlabError(f"awq batch_size must be a positive integer, got {self.batch_size}")
        check_skip(self.skip)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)


def quantize_awq(model, calib: Tensor | None, cfg: AWQConfig | None = None):
    """Scale (activation-aware) and RTN-quantize every decoder-layer linear of `model` in place."""
    return _awq(model, calib, cfg or AWQConfig(), quantize=True)


def apply_awq_scales(model, calib: Tensor | None, cfg: AWQConfig | None = None):
    """Only the scaling half of AWQ: the model stays float and computes the same function."""
    return _awq(model, calib, cfg or AWQConfig(), quantize=False)


def _awq(model, calib, cfg: AWQConfig, quantize: bool):
    if calib is None:
        raise LlmlabError("AWQ needs calibration text: give --calib FILE")
    # refuse a quantized model or a bad group size before anything changes
    rtn_targets(model, RTNConfig(cfg.bits, cfg.group_size, cfg.symmetric, cfg.skip))
    scaling_groups(decoder_layers(model)[0])  # and a block AWQ cannot scale
    prefix, spec = layers_prefix(model), cfg.spec

    def solve(index, layer, run):
        groups = scaling_groups(layer)
        targets = {n for _, names, _ in groups for n in names if not skipped(f"{prefix}.{index}.{n}", cfg.skip)}
        modules = {n: layer.get_submodule(n) for _, names, _ in groups for n in names}
        with observe(modules) as stats:
            run()
        for prev, names, tie in groups:
            kept = [n for n in names if n in targets]
            if kept:
                x_mean = (stats[names[0]].abs_sum / stats[names[0]].n).float()  # (in,)
                xtx = (stats[names[0]].xtx / stats[names[0]].n).float()        # (in, in)
                s = search_scale([modules[n].weight for n in kept], xtx, x_mean, spec, cfg.grid, tie)
                _fold(layer.get_submodule(prev), [modules[n] for n in names], s, tie)
        if quantize:
            for name in sorted(targets):
                set_module(layer, name, QuantLinear.from_float(layer.get_submodule(name), spec))

    # torch's int4 CPU kernel is ~30x slower than dequantize-and-matmul on fp32 inputs: not for the replay
    kernels, QuantLinear.use_kernels = QuantLinear.use_kernels, False
    try:
        calibrate_layers(model, calib, solve, batch_size=cfg.batch_size, desc=f"awq w{cfg.bits}")
    finally:
        QuantLinear.use_kernels = kernels
    if quantize:
        model.llmlab_quant_method = "awq"
    return model


def scaling_groups(layer: nn.Module) -> list[tuple[str, list[str], "Tie | None"]]:
    """(previous op, linears sharing its output, head tie for GQA) for each scalable group of a block."""
    found = dict(layer.named_modules())
    missing = [n for prev, names in LLAMA_GROUPS for n in [prev, *names] if n not in found]
    linears = linears_of(layer)
    if missing or any(n not in linears for _, names in LLAMA_GROUPS for n in names):
        raise LlmlabError(f"AWQ supports LLaMA-style decoder blocks (LLaMA, Mistral, Qwen2); {type(layer).__name__} "
                          f"lacks {', '.join(missing) or 'nn.Linear projections'}; use --method gptq or rtn")
    groups = []
    for prev, names in LLAMA_GROUPS:
        tie = None
        if prev == "self_attn.v_proj":
            tie = Tie.of(layer.self_attn, found[prev], found[names[0]])
        groups.append((prev, names, tie))
    return groups


@dataclass
class Tie:
    """Grouped-query attention: query head h reads value head h // n_rep, so o_proj's input channel
    (h·head_dim + d) carries v_proj's output channel ((h // n_rep)·head_dim + d). One scale per v channel."""
    n_kv: int
    n_rep: int
    head_dim: int

    @staticmethod
    def of(attn: nn.Module, v: nn.Linear, o: nn.Linear) -> "Tie":
        n_rep = o.in_features // v.out_features
        head_dim = getattr(attn, "head_dim", None) or (v.out_features if n_rep == 1 else 0)
        if n_rep * v.out_features != o.in_features or not head_dim or v.out_features % head_dim:
            raise LlmlabError(f"AWQ cannot match v_proj ({v.out_features} outputs) to o_proj "
                              f"({o.in_features} inputs); this attention layout is not supported")
        return Tie(v.out_features // head_dim, n_rep, head_dim)

    def reduce(self, x: Tensor) -> Tensor:  # (n_kv·n_rep·head_dim,) -> (n_kv·head_dim,)
        return x.view(self.n_kv, self.n_rep, self.head_dim).mean(1).reshape(-1)

    def pick(self, s: Tensor) -> Tensor:  # an expanded scale back to one value per v channel
        return s.view(self.n_kv, self.n_rep, self.head_dim)[:, 0].reshape(-1)

    def expand(self, s: Tensor) -> Tensor:  # (n_kv·head_dim,) -> (n_kv·n_rep·head_dim,)
        return s.view(self.n_kv, 1, self.head_dim).expand(-1, self.n_rep, -1).reshape(-1)


@torch.no_grad()
def search_scale(weights: list[Tensor], xtx: Tensor, x_mean: Tensor, spec: QuantSpec, grid: int = 20,
                 tie: Tie | None = None) -> Tensor:
    """The s (in,) of the best α: minimises Σ_W tr(ΔW · XᵀX/n · ΔWᵀ) over the weights reading X.

    With a `tie`, s is chosen per value channel and returned expanded to o_proj's inputs.
    """
    base = (tie.reduce(x_mean) if tie else x_mean).clamp(min=1e-4)
    best, best_s = float("inf"), None
    for k in range(grid):
        s = base.pow(k / grid)
        s = s / (s.max() * s.min()).sqrt()
        s = tie.expand(s) if tie else s
        loss = sum(_output_error(W.float(), s, xtx, spec) for W in weights)
        if loss < best:
            best, best_s = loss, s
    return best_s


def _output_error(W: Tensor, s: Tensor, xtx: Tensor, spec: QuantSpec) -> float:
    """‖X Wᵀ − (X diag(s)⁻¹) Q(W diag(s))ᵀ‖² / n, from xtx = XᵀX / n."""
    dW = W - fake_quantize(W * s, spec) / s  # (out, in)
    return float(((dW @ xtx) * dW).sum())


@torch.no_grad()
def _fold(prev: nn.Module, linears: list[nn.Module], s: Tensor, tie: Tie | None) -> None:
    """W ← W·diag(s) for the readers, and ÷ s into the op producing their input: the function is unchanged."""
    s_prev = tie.pick(s) if tie else s  # (prev's outputs,)
    if isinstance(prev, nn.Linear):  # its output rows are the readers' input channels
        prev.weight.div_(s_prev.to(prev.weight.dtype)[:, None])
    else:  # RMSNorm / LayerNorm: y = w ⊙ norm(x) (+ b)
        prev.weight.div_(s_prev.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s_prev.to(prev.bias.dtype))
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype)[None, :])

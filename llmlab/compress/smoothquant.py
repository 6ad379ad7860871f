"""SmoothQuant: accurate and efficient post-training quantization for large language models (W8A8).

Xiao, Lin, Seznec, Wu, Demouth, Han 2022, https://arxiv.org/abs/2211.10438
(reference code: https://github.com/mit-han-lab/smoothquant).

Activations have a few input channels j with huge, systematic magnitudes, so a per-token int8
grid wastes its levels on them; weights are flat and easy. A per-channel factor s moves the
difficulty from X to W without changing the product (eq. 3-4 of the paper):

    Y = (X · diag(s)⁻¹) · (diag(s) · Wᵀ),      s_j = max|X_j|^α / max|W_j|^(1−α)

with α the migration strength (0.5 usually; 0.8 or more for models with worse outliers). diag(s)⁻¹
is folded into the layer norm that produces X (its weight and bias), diag(s) into the columns of
every linear that reads that norm's output (q/k/v; gate/up or fc1), so smoothing alone is exact
in float. max|X_j| is recorded with hooks while the whole float model runs over the calibration
batches, like the reference's `get_act_scales`.

Supported blocks: pre-norm ones where a norm's output is read only by linears: LLaMA, Qwen2,
Mistral, OPT (pre-LN), GPT-2, GPT-NeoX. The norm → linear pairs are found by watching which
linears receive the very tensor a norm returned; afterwards the float logits are compared with
the ones before, and a model where smoothing is not exact (post-LN OPT-350m, Gemma's (1 + w)
RMSNorm) is put back and refused with an LlmlabError.

Then W8A8 (`W8A8Linear`, kind "w8a8", shared with ZeroQuant): symmetric int8 weights per output
channel (or in groups of input columns) and int8 activations per token (dynamic) or per tensor
(static, from the calibrated max), multiplied as int8 × int8 → int32 by torch._int_mm:

    Y = (Δ_x ⊗ Δ_w) ∘ (X_q · W_qᵀ),    X_q = round(X / Δ_x),  Δ_x = max_j |X_t,j| / 127 (per token t)
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmlab.compress.calibrate import check_skip, layers_prefix, linears_of, observe
from llmlab.compress.rtn import rtn_targets
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers
from llmlab.models.packed.quant import QuantSpec
from llmlab.models.packed.w8a8 import W8A8Linear, check_w8a8
from llmlab.models.surgery import set_module


@dataclass
class SmoothQuantConfig:
    alpha: float = field(0.5, help="migration strength α in [0, 1]: how much of the activations' range moves "
                                   "into the weights (0.5 usual, 0.8 for strong outliers)")
    smooth: bool = field(True, help="apply the smoothing; false gives the plain W8A8 baseline")
    bits: int = field(8, help="weight bits: 8 (or 4)")
    group_size: int = field(0, help="weight grid: 0 one scale per output channel, >0 groups of that many inputs")
    act_scale: str = field("per_token", help="activation scale: per_token (dynamic) or per_tensor (static, "
                                             "calibrated)")
    batch_size: int = field(8, help="calibration sequences per forward pass")
    skip: list[str] = field([], help="regexes of full module names to leave in float")

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise LlmlabError(f"smoothquant alpha must be in [0, 1], got {self.alpha}; 0.5 is the usual value")
        check_w8a8(self.bits, self.group_size, self.act_scale)
        if self.batch_size < 1:
            raise LlmlabError(f"smoothquant batch_size must be a positive integer, got {self.batch_size}")
        check_skip(self.skip)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, symmetric=True)


# ---------------------------------------------------------------- int8 building blocks (also used by LLM.int8())


# ---------------------------------------------------------------- the W8A8 layer


# ---------------------------------------------------------------- the SmoothQuant verb

def quantize_smoothquant(model, calib: Tensor | None, cfg: SmoothQuantConfig | None = None):
    """Smooth (unless cfg.smooth is false) and turn every decoder-layer linear into W8A8, in place."""
    cfg = cfg or SmoothQuantConfig()
    targets = decoder_linears(model, cfg)  # checked before anything changes
    absmax = {}
    if cfg.smooth or cfg.act_scale == "per_tensor":
        if calib is None:
            raise LlmlabError("SmoothQuant needs calibration text for its activation scales: give --calib FILE")
        absmax = activation_absmax(model, calib, cfg.batch_size)
    if cfg.smooth:
        smooth_model(model, absmax, cfg.alpha, calib[:1, :64])
    for name, linear in targets.items():
        layer = W8A8Linear.from_float(linear, cfg.bits, cfg.group_size, cfg.act_scale, absmax.get(name))
        set_module(model, name, layer)
    model.llmlab_quant_method = "smoothquant" if cfg.smooth else "w8a8"
    return model


def decoder_linears(model, cfg=None) -> dict[str, nn.Linear]:
    """Full name -> nn.Linear of the decoder layers: all of them, or those `cfg` (with .spec and .skip) quantizes,
    refusing (LlmlabError, nothing changed) an already quantized layer or a group size that does not fit."""
    prefix, layers = layers_prefix(model), decoder_layers(model)
    names = rtn_targets(model, cfg) if cfg is not None else [list(linears_of(layer)) for layer in layers]
    return {f"{prefix}.{i}.{n}": layers[i].get_submodule(n) for i in range(len(layers)) for n in names[i]}


@torch.no_grad()
def activation_absmax(model, calib: Tensor, batch_size: int = 8) -> dict[str, Tensor]:
    """max |X_j| (in,) float32 of every decoder-layer linear's input over the calibration ids (n, T)."""
    if calib.ndim != 2 or calib.numel() == 0:
        raise LlmlabError(f"calibration ids must be a (n_samples, seq_len) tensor, got shape {tuple(calib.shape)}")
    linears = decoder_linears(model)
    device = next(model.parameters()).device
    with observe(linears, xtx=False) as stats:
        for batch in calib.split(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    return {name: s.abs_max for name, s in stats.items()}


@torch.no_grad()
def smooth_model(model, absmax: dict[str, Tensor], alpha: float, probe: Tensor) -> None:
    """Fold s into every norm → linears pair; `absmax` of the smoothed linears is divided by s to match.
    `probe` (1, T) ids: the float logits on it must not change (checked; the model is restored if they do)."""
    groups, before = norm_groups(model, probe)
    if not groups:
        raise LlmlabError(f"found no layer norm feeding linears in {type(model).__name__}; SmoothQuant needs "
                          "pre-norm blocks (LLaMA, Qwen2, Mistral, OPT, GPT-2, GPT-NeoX): set smooth: false")
    modules = dict(model.named_modules())
    scales = []
    for norm, names in groups:
        s = smoothing_scales(absmax[names[0]], [modules[n].weight for n in names], alpha)
        fold(norm, [modules[n] for n in names], s)
        scales.append(s)
    after = _logits(model, probe)
    # exact up to rounding (~1e-7 relative in fp32, ~1e-2 in bf16); a post-norm block changes by ~0.4
    change = ((after - before).abs().mean() / before.abs().mean()).item()
    if change > max(1e-3, 8 * torch.finfo(next(model.parameters()).dtype).eps):
        for (norm, names), s in zip(groups, scales):
            fold(norm, [modules[n] for n in names], 1 / s)
        raise LlmlabError(f"smoothing changes {type(model).__name__}'s float outputs (a norm's output feeds more "
                          "than its linears: post-norm block or (1 + w) RMSNorm); SmoothQuant does not support it: "
                          "set smooth: false for plain W8A8")
    for (_, names), s in zip(groups, scales):
        for n in names:
            absmax[n] = absmax[n] / s


def smoothing_scales(x_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α), W_j the j-th input column over all linears sharing X; (in,) float32.
    The clamps are the reference's: a dead channel (max|X_j| = 0) keeps s_j = 1e-5, not 0."""
    w_absmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp(min=1e-5)  # (in,)
    return (x_absmax.float().pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)


def fold(norm: nn.Module, linears: list[nn.Module], s: Tensor) -> None:
    """norm(x) / s and W · diag(s): the norm's weight and bias divided by s, each linear's columns times s."""
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype))  # (out, in) * (in,): scales the input columns


def norm_groups(model, probe: Tensor) -> tuple[list[tuple[nn.Module, list[str]]], Tensor]:
    """[(norm, full names of the linears that read exactly its output)] per decoder layer, and the logits on
    `probe`. The pairs come from one forward pass: a linear reads a norm's output when its input *is* the
    tensor the norm returned."""
    prefix, outputs, inputs, handles = layers_prefix(model), {}, {}, []
    for i, layer in enumerate(decoder_layers(model)):
        for name, m in linears_of(layer).items():
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, full=f"{prefix}.{i}.{name}": inputs.__setitem__(full, args[0])))
        for m in layer.modules():
            if _is_norm(m):
                handles.append(m.register_forward_hook(lambda mod, args, out: outputs.__setitem__(mod, out)))
    try:
        logits = _logits(model, probe)
    finally:
        for h in handles:
            h.remove()
    groups = [(norm, [n for n, x in inputs.items() if x is out]) for norm, out in outputs.items()]
    return [(norm, names) for norm, names in groups if names], logits


def _is_norm(m: nn.Module) -> bool:
    weight = getattr(m, "weight", None)
    return "norm" in type(m).__name__.lower() and isinstance(weight, nn.Parameter) and weight.ndim == 1


def _logits(model, ids: Tensor) -> Tensor:
    training = model.training
    model.eval()  # dropout (tiny GPT-2 has some) would make the before/after check meaningless
    try:
        return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits.float()
    finally:
        model.train(training)

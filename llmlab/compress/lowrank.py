"""Low-rank decomposition of linear layers: truncated SVD, ASVD, SVD-LLM whitening, and LoRC.

A linear y = W x (W: out × in) becomes two: y = U_k (V_k x) with rank k, which costs k·(in + out)
parameters instead of in·out, so it saves only when k < in·out / (in + out).

    svd      W = U Σ Vᵀ,  W ≈ (U_k Σ_k^½)(Σ_k^½ V_kᵀ)       Eckart–Young: best rank k in ‖W − W'‖_F
    asvd     W S = U Σ Vᵀ,  W ≈ (U_k Σ_k^½)(Σ_k^½ V_kᵀ S⁻¹),  S = diag(mean|x_j|)^α
             Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing
             Large Language Models", https://arxiv.org/abs/2312.05821 (α = 0.5): input channels that
             carry large activations keep more of their weight.
    svd_llm  W L = U Σ Vᵀ,  W ≈ (U_k Σ_k^½)(Σ_k^½ V_kᵀ L⁻¹),  XᵀX = L Lᵀ (Cholesky)
             Wang et al. 2024, "SVD-LLM", https://arxiv.org/abs/2403.07378: since
             ‖X Wᵀ − X W'ᵀ‖_F = ‖(W − W') L‖_F, this is the best rank k for the layer's *outputs*.

The rank is given directly (`rank`), as a fraction of each layer's parameters kept (`param_ratio`,
the ASVD paper's knob, k = ⌊ratio · in·out/(in+out)⌋), or as the fraction of the spectrum's energy
Σσᵢ² to keep (`energy`). asvd/svd_llm read the inputs of each layer through the calibration
scaffold (`calibrate.observe`), layer by layer, so a layer sees the already decomposed layers' outputs.

Each decomposed layer is a `LowRankLinear` holding two plain nn.Linear (`v`: in → k, `u`: k → out),
so `llmlab quantize` and the pruners find and compress the factors like any other linear.

LoRC (Yao et al. 2023, "ZeroQuant-V2", https://arxiv.org/abs/2303.08302, §5; used with FP formats in
ZeroQuant-FP): after quantizing W to Ŵ, the error E = W − Ŵ is small but structured; keep its
rank-k part in float beside the quantized layer, y = Ŵx + U_k(V_k x)  (`add_lorc`, and
`llmlab quantize --lorc-rank k`).

Both wrappers are saved in the packed folder (models/packed/io.py: kinds "lowrank" and "lorc" in its
list of swapped modules, each before the quantized layers inside it), so decompose → quantize and quantize → LoRC
models reload with `load_model(folder)`; folders with the older `llmlab_lowrank.json` still load.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlab import methods
from llmlab.compress.calibrate import calibrate_layers, check_skip, layers_prefix, linears_of, observe, skipped
from llmlab.compress.gptq import one_thread  # LAPACK too: a 576² SVD takes 0.2 s on one thread, 10+ s on two busy ones
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers
from llmlab.models.packed.lowrank import LoRCLinear, LowRankLinear
from llmlab.models.packed.qlinear import QuantizedLinear, quantized_linears
from llmlab.models.surgery import linear_weight, set_module

LOWRANK_METHODS = tuple(methods.names("decompose"))  # svd, asvd, svd_llm


@dataclass
class LowRankConfig:
    method: str = field("svd", help="svd (weights only), asvd (scaled by mean |x|^alpha), svd_llm (whitened by XᵀX)")
    rank: int | None = field(None, help="rank of every decomposed layer")
    param_ratio: float | None = field(None, help="fraction of each layer's parameters kept, in (0, 1)")
    energy: float | None = field(None, help="keep the smallest rank holding this fraction of Σσ², in (0, 1]")
    alpha: float = field(0.5, help="asvd: exponent of the activation scale")
    damp: float = field(0.01, help="svd_llm: added to XᵀX's diagonal, as a fraction of its mean")
    skip: list[str] = field([], help="regexes of full module names to leave whole")
    force: bool = field(False, help="also decompose where the factors hold more parameters than W")
    batch_size: int = field(8, help="calibration windows per forward pass")

    def __post_init__(self):
        if self.method not in LOWRANK_METHODS:
            raise LlmlabError(f"low-rank method must be one of {', '.join(LOWRANK_METHODS)}, got '{self.method}'")
        given = [k for k in ("rank", "param_ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise LlmlabError(f"give exactly one of rank, param_ratio, energy (got {', '.join(given) or 'none'})")
        if self.rank is not None and self.rank < 1:
            raise LlmlabError(f"rank must be at least 1, got {self.rank}")
        if self.param_ratio is not None and not 0 < self.param_ratio < 1:
            raise LlmlabError(f"param_ratio must be in (0, 1), got {self.param_ratio}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LlmlabError(f"energy must be in (0, 1], got {self.energy}")
        if self.alpha < 0 or self.damp < 0 or self.batch_size < 1:
            raise LlmlabError("alpha and damp must be >= 0 and batch_size >= 1, "
                              f"got {self.alpha}, {self.damp}, {self.batch_size}")
        check_skip(self.skip)

    @property
    def needs_calib(self) -> bool:
        return self.method != "svd"


def factorize(weight: Tensor, rank: int | None = None, energy: float | None = None,
              scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(U (out, k), V (k, in)) with U·V ≈ W, from the SVD of W·scale: `scale` is None (plain SVD), a
    (in,) diagonal (ASVD's S) or an (in, in) lower-triangular factor (SVD-LLM's L); V absorbs scale⁻¹."""
    with one_thread():
        return _factorize(weight, rank, energy, scale)


def _factorize(weight: Tensor, rank: int | None, energy: float | None, scale: Tensor | None):
    w = weight.detach().double()
    if scale is None:
        ws = w
    elif scale.ndim == 1:
        ws = w * scale.double()
    else:
        ws = w @ scale.double()
    U, S, Vh = torch.linalg.svd(ws, full_matrices=False)  # (out, m), (m,), (m, in)
    k = rank if rank is not None else _energy_rank(S, energy)
    k = min(k, S.numel())
    root = S[:k].sqrt()
    u, v = U[:, :k] * root, root[:, None] * Vh[:k]
    if scale is not None and scale.ndim == 1:
        v = v / scale.double()
    elif scale is not None:  # v L⁻¹: solve Lᵀ Xᵀ = vᵀ
        v = torch.linalg.solve_triangular(scale.double().T, v.T, upper=True).T
    return u.to(weight.dtype), v.to(weight.dtype)


def _energy_rank(S: Tensor, energy: float) -> int:
    """Smallest k with Σ_{i<k} σᵢ² ≥ energy · Σ σᵢ²."""
    cum = (S.square().cumsum(0) / S.square().sum()).tolist()
    return next((i + 1 for i, c in enumerate(cum) if c >= energy - 1e-12), len(cum))


def layer_rank(linear: nn.Linear, cfg: LowRankConfig) -> int | None:
    """The rank for this layer by `rank`/`param_ratio` (None: by energy, known after the SVD)."""
    full = min(linear.in_features, linear.out_features)
    if cfg.rank is not None:
        return min(cfg.rank, full)
    if cfg.param_ratio is not None:
        n_in, n_out = linear.in_features, linear.out_features
        return max(1, int(cfg.param_ratio * n_in * n_out / (n_in + n_out)))
    return None


def lowrank_linear(linear: nn.Linear, cfg: LowRankConfig, stats=None) -> LowRankLinear | None:
    """The factorized replacement of `linear`, or None where it would not save parameters (unless cfg.force)."""
    rank = layer_rank(linear, cfg)
    scale = None
    if cfg.method == "asvd":
        scale = (stats.abs_sum / stats.n).clamp_min(1e-8) ** cfg.alpha  # (in,)
    elif cfg.method == "svd_llm":
        xtx = stats.xtx / stats.n
        xtx = xtx + cfg.damp * xtx.diagonal().mean() * torch.eye(len(xtx), dtype=xtx.dtype, device=xtx.device)
        with one_thread():
            scale = torch.linalg.cholesky(xtx)  # (in, in), lower
    u, v = factorize(linear.weight, rank, cfg.energy, None if scale is None else scale.to(linear.weight.device))
    k, n_in, n_out = v.shape[0], linear.in_features, linear.out_features
    if k * (n_in + n_out) >= n_in * n_out and not cfg.force:
        return None
    layer = LowRankLinear(n_in, n_out, k, linear.bias is not None, linear.weight.device, linear.weight.dtype)
    with torch.no_grad():
        layer.u.weight.copy_(u)
        layer.v.weight.copy_(v)
        if linear.bias is not None:
            layer.u.bias.copy_(linear.bias)
    return layer


def decompose(model, calib: Tensor | None = None, cfg: LowRankConfig | None = None):
    """Replace the decoder layers' linears by LowRankLinear in place; returns the model.

    svd needs no data (`calib` may be None); asvd and svd_llm read (n, T) calibration ids.
    """
    cfg = cfg or LowRankConfig(param_ratio=0.5)
    prefix, done = layers_prefix(model), {}
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise LlmlabError("the model is already decomposed; decompose the original model instead")
    if cfg.needs_calib and calib is None:
        raise LlmlabError(f"low-rank method {cfg.method} reads activations: pass calibration ids (--calib FILE)")

    def solve(index, layer, run=None):
        names = [n for n in linears_of(layer) if not skipped(f"{prefix}.{index}.{n}", cfg.skip)]
        stats = {}
        if run is not None:
            with observe({n: layer.get_submodule(n) for n in names}, xtx=cfg.method == "svd_llm") as stats:
                run()
        for name in names:
            new = lowrank_linear(layer.get_submodule(name), cfg, stats.get(name))
            if new is not None:
                set_module(layer, name, new)
                done[f"{prefix}.{index}.{name}"] = new.rank

    if cfg.needs_calib:
        calibrate_layers(model, calib, solve, batch_size=cfg.batch_size, desc=cfg.method)
    else:
        with torch.no_grad():
            for index, layer in enumerate(tqdm(decoder_layers(model), desc="svd", unit="layer", disable=None)):
                solve(index, layer)
    model.llmlab_lowrank = {"method": cfg.method, "modules": done}
    return model


@torch.no_grad()
def add_lorc(quantized, reference, rank: int):
    """LoRC: beside each quantized linear of `quantized`, a rank-`rank` float correction U_k V_k of its error
    E = W − Ŵ against the same-named float linear of `reference` (the model before quantization)."""
    for name, (q, w) in _lorc_targets(quantized, reference, rank).items():
        error = w.float() - q.dequantized_weight().to(w.device)  # (out, in)
        u, v = factorize(error, min(rank, min(error.shape)))
        layer = LoRCLinear(q, u.shape[1], w.device, w.dtype)
        layer.u.weight.copy_(u)
        layer.v.weight.copy_(v)
        set_module(quantized, name, layer)
    return quantized


def _lorc_targets(quantized, reference, rank: int) -> dict:
    """name -> (quantized layer, reference weight (out, in)); LlmlabError, nothing changed, where LoRC cannot apply."""
    if rank < 1:
        raise LlmlabError(f"LoRC rank must be at least 1, got {rank}")
    if any(isinstance(m, LoRCLinear) for m in quantized.modules()):
        raise LlmlabError("the model already has LoRC corrections; add them to the plain quantized model")
    layers, floats, targets = quantized_linears(quantized), dict(reference.named_modules()), {}
    if not layers:
        raise LlmlabError("LoRC corrects quantized layers and this model has none; quantize it first")
    for name, q in layers.items():
        if type(q).dequantized_weight is QuantizedLinear.dequantized_weight:
            raise LlmlabError(f"LoRC needs the dequantized weight of {name}, which layers of kind '{q.kind}' "
                              "do not give")
        if not hasattr(floats.get(name), "weight"):
            raise LlmlabError(f"LoRC: the reference model has no float layer '{name}'; pass the model before "
                              "quantizing")
        targets[name] = (q, linear_weight(floats[name]))
    _check_not_rescaled(quantized, reference, layers)
    return targets


def _check_not_rescaled(quantized, reference, layers: dict):
    """AWQ and SmoothQuant fold scales into the norms before quantizing, so their Ŵ approximates a rescaled W
    and W − Ŵ against the reference is not the quantization error: every other tensor must be unchanged."""
    ref, inside = reference.state_dict(), tuple(f"{name}." for name in layers)
    for name, t in quantized.state_dict().items():
        if name in ref and not name.startswith(inside) and not torch.equal(t, ref[name]):
            raise LlmlabError(f"LoRC: {name} differs from the reference model's (the quantizer rescaled the "
                              "float weights, as awq and smoothquant do); use LoRC with rtn, gptq, zeroquant, "
                              "llm_int8 or nf4")

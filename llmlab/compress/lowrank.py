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

Both wrappers are saved in io.py's folder (kinds "lowrank" and "lorc" in its list of swapped
modules, each before the quantized layers inside it), so decompose → quantize and quantize → LoRC
models reload with `load_model(folder)`; folders with the older `llmlab_lowrank.json` still load.
"""

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlab.compress.calibrate import (calibrate_layers, calibration_data, check_skip, layers_prefix, linears_of,
                                       observe, set_module, skipped)
from llmlab.compress.gptq import one_thread  # LAPACK too: a 576² SVD takes 0.2 s on one thread, 10+ s on two busy ones
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers

LOWRANK_METHODS = ("svd", "asvd", "svd_llm")
MARKER = "llmlab_lowrank.json"  # the marker of decomposed folders written before io.py knew low-rank layers


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


class LowRankLinear(nn.Module):
    """y = u(v(x)): W ≈ U·V with V (rank, in) and U (out, rank); the bias stays on `u`."""
    kind = "lowrank"  # its entry in io.py's list of swapped modules

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def config(self) -> dict:
        return {"rank": self.rank}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, rank: int) -> "LowRankLinear":
        return cls(in_features, out_features, rank, bias, device="meta")  # the folder's factors are assigned

    def forward(self, x: Tensor) -> Tensor:
        return self.u(self.v(x))


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
    from transformers.pytorch_utils import Conv1D

    from llmlab.compress.qlinear import QuantizedLinear, quantized_linears

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
        w = floats[name].weight
        targets[name] = (q, w.T if isinstance(floats[name], Conv1D) else w)  # GPT-2 stores (in, out)
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


class LoRCLinear(nn.Module):
    """y = Ŵx + U(Vx): a quantized layer plus the low-rank part of its quantization error."""
    kind = "lorc"  # its entry in io.py's list of swapped modules, before `<name>.base_layer`

    def __init__(self, base_layer: nn.Module, rank: int, device=None, dtype=None):
        super().__init__()
        self.base_layer, self.rank = base_layer, rank
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.v = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)

    def config(self) -> dict:
        return {"rank": self.rank}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, rank: int) -> "LoRCLinear":
        # A stand-in of the base layer's shape, on meta so no float weight is made: the entry
        # `<name>.base_layer` swaps in the quantized one, and the folder's u/v are assigned.
        return cls(nn.Linear(in_features, out_features, bias=bias, device="meta"), rank, device="meta")

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.u(self.v(x.to(self.v.weight.dtype))).to(x.dtype)


def save_decomposed(model, tokenizer, out: str | Path) -> Path:
    """io.py's folder (config, tokenizer, safetensors with the factors, the marker listing each LowRankLinear)."""
    from llmlab.compress.io import save_quantized

    return save_quantized(model, tokenizer, out)


def load_decomposed(folder: str | Path, dtype: str | torch.dtype = "fp32"):
    """(model, tokenizer) from a decomposed folder: io.py's, or one with the older llmlab_lowrank.json."""
    from llmlab.compress import io

    folder = Path(folder)
    if io.is_quantized_folder(folder):
        return io.load_quantized(folder, dtype)
    try:  # {"format": 1, "method": "svd", "modules": {name: {"rank": k, "in": n, "out": m}}}
        old = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        modules = {name: {"kind": "lowrank", "rank": int(m["rank"])} for name, m in old["modules"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LlmlabError(f"{folder / MARKER} is not a readable llmlab low-rank file ({e}); decompose again") from None
    return io.load_with_marker(folder, {"method": None, "lowrank": old.get("method"), "modules": modules}, dtype)


@dataclasses.dataclass
class DecomposeConfig:
    model: str = field("smollm2-135m", help="model spec: built-in name, folder, .gguf, run folder or hub id")
    method: str = field("svd", help=", ".join(LOWRANK_METHODS))
    rank: int | None = field(None, help="rank of every decomposed layer")
    param_ratio: float | None = field(None, help="fraction of each layer's parameters kept, in (0, 1)")
    energy: float | None = field(None, help="keep the smallest rank with this fraction of Σσ², in (0, 1]")
    alpha: float = field(0.5, help="asvd: exponent of the activation scale")
    skip: list[str] = field([], help="regexes of full module names to leave whole")
    calib: str | None = field(None, help="calibration text file (asvd, svd_llm)")
    n_samples: int = field(32, help="calibration windows")
    seq_len: int = field(512, help="tokens per calibration window")
    seed: int = field(0, help="seed that picks the calibration windows")
    dtype: str = field("fp32", help="fp32, bf16 or fp16")
    device: str = field("cpu", help="cpu, cuda or auto")

    def __post_init__(self):
        cfg = self.lowrank_config()
        if cfg.needs_calib and not self.calib:
            raise LlmlabError(f"--method {self.method} reads activations: give --calib FILE (not the evaluation text)")

    def lowrank_config(self) -> LowRankConfig:
        return LowRankConfig(method=self.method, rank=self.rank, param_ratio=self.param_ratio, energy=self.energy,
                             alpha=self.alpha, skip=list(self.skip))


def decompose_verb(cfg: DecomposeConfig, opts) -> dict:
    from llmlab.compress.quantize import folder_bytes, state_bytes
    from llmlab.models import load_model
    from llmlab.runs import start_run

    lr_cfg = cfg.lowrank_config()
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    calib = calibration_data(tokenizer, cfg.calib, cfg.n_samples, cfg.seq_len, cfg.seed) if lr_cfg.needs_calib else None
    before, bytes_before = sum(p.numel() for p in set(model.parameters())), state_bytes(model)
    with start_run("decompose", cfg, opts) as run:
        start = time.perf_counter()
        decompose(model, calib, lr_cfg)
        seconds = time.perf_counter() - start
        saved = save_decomposed(model, tokenizer, run.artifact("model"))
        ranks = list(model.llmlab_lowrank["modules"].values())
        result = {"model": cfg.model, "method": cfg.method, "layers": len(ranks),
                  "mean_rank": round(sum(ranks) / max(len(ranks), 1), 1), "params_before": before,
                  "params_after": sum(p.numel() for p in set(model.parameters())), "bytes_before": bytes_before,
                  "size_on_disk_bytes": folder_bytes(saved), "seconds": round(seconds, 2), "saved": str(saved)}
        run.log_metrics(**result)
        summary = run.finish(result)
    print(f"decomposed {cfg.model} with {cfg.method}: {len(ranks)} layers (mean rank {result['mean_rank']}), "
          f"{before / 1e6:.1f}M -> {result['params_after'] / 1e6:.1f}M parameters in {seconds:.1f} s -> {saved}")
    return summary

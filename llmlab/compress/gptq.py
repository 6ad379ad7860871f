"""GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers (Frantar et al. 2022).

https://arxiv.org/abs/2210.17323 — reference code: https://github.com/IST-DASLab/gptq

Each linear layer (weight W, out × in) is quantized to the Ŵ that best keeps its outputs on the
calibration inputs X (n × in), the layer-wise problem

    argmin_Ŵ ‖X Wᵀ − X Ŵᵀ‖²,      H = 2/n · XᵀX   (its Hessian, the same for every row of W)

solved greedily column by column as in Optimal Brain Quantization: quantize column j, then move
the not-yet-quantized columns F to absorb the error (eq. 3 of the paper):

    δ_F = − (w_j − quant(w_j)) / [H_F⁻¹]_jj · (H_F⁻¹)_{j,:}

and drop j from H_F⁻¹ by one step of Gaussian elimination. GPTQ makes this fast (§4):
1. Every row uses one column order, so H_F⁻¹ is shared by all rows.
2. The rows (H_F⁻¹)_{j,:}/√[H_F⁻¹]_jj that the eliminations produce are the rows of the upper
   Cholesky factor U of H⁻¹, so with U = chol(H⁻¹) computed once:
       err_j = (w_j − q_j) / U_jj,      W_{:, j:} −= err_j · U_{j, j:}
3. Lazy batches: inside a block of B columns the updates touch only the block; the rest of W gets
   the block's errors in one matmul,  W_{:, i2:} −= Err · U_{i1:i2, i2:}.

Dampening H += λI with λ = damp · mean(diag H) keeps the inverse stable; a dead input (diag H = 0,
never active in calibration) gets H_jj = 1 and W_{:, j} = 0 as in the reference. With groups, a
group's grid is fitted (`fit_grid`) when the loop enters it, on the current, error-updated
weights of its columns. act-order ("desc_act") visits columns by descending diag H; the grids are
then fitted up front on the original contiguous groups (AutoGPTQ's static_groups), so the stored
format stays plain groups and needs no permutation index at inference.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from llmlab.compress.calibrate import calibrate_layers, check_skip, layers_prefix, linears_of, observe, skipped
from llmlab.compress.rtn import RTNConfig, rtn_targets
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.packed.qlinear import QuantLinear
from llmlab.models.packed.quant import QuantSpec, fit_grid, quantize, quantize_column
from llmlab.models.surgery import set_module


@dataclass
class GPTQConfig:
    bits: int = field(4, help="bits per weight, 2 to 8")
    group_size: int = field(128, help="input columns per quantization group; 0 per output channel, -1 per tensor")
    symmetric: bool = field(False, help="symmetric grid (zero point in the middle) instead of min/max")
    damp: float = field(0.01, help="dampening: add damp * mean(diag H) to the Hessian's diagonal")
    block_size: int = field(128, help="columns per lazy-batch block (speed only: results do not depend on it)")
    act_order: bool = field(False, help="quantize columns in order of decreasing Hessian diagonal (desc_act)")
    skip: list[str] = field([], help="regexes of full module names to leave in float")
    batch_size: int = field(8, help="calibration sequences per forward pass")

    def __post_init__(self):
        QuantSpec(self.bits, self.group_size, self.symmetric)  # validates bits and group_size
        if not 0 < self.damp <= 1:
            raise LlmlabError(f"gptq damp must be in (0, 1], got {self.damp}; 0.01 is the usual value")
        if self.block_size < 1:
            raise LlmlabError(f"gptq block_size must be a positive integer, got {self.block_size}")
        if self.batch_size < 1:
            raise LlmlabError(f"gptq batch_size must be a positive integer, got {self.batch_size}")
        check_skip(self.skip)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)


def quantize_gptq(model, calib: Tensor | None, cfg: GPTQConfig | None = None):
    """Quantize every decoder-layer linear of `model` in place with GPTQ; returns the model."""
    cfg = cfg or GPTQConfig()
    if calib is None:
        raise LlmlabError("GPTQ needs calibration text: give --calib FILE")
    # refuse a quantized model or a bad group size before anything changes
    rtn_targets(model, RTNConfig(cfg.bits, cfg.group_size, cfg.symmetric, cfg.skip))
    prefix, spec = layers_prefix(model), cfg.spec

    def solve(index, layer, run):
        linears = {n: m for n, m in linears_of(layer).items() if not skipped(f"{prefix}.{index}.{n}", cfg.skip)}
        with observe(linears) as stats:
            run()
        for name, linear in linears.items():
            H = (2 / stats[name].n * stats[name].xtx).float()  # (in, in)
            w_hat, scale, zero = gptq(linear.weight, H, spec, cfg.damp, cfg.block_size, cfg.act_order,
                                      name=f"{prefix}.{index}.{name}")
            q = quantize(w_hat, scale, zero, spec)  # w_hat lies on the grid: this recovers its integers
            set_module(layer, name, QuantLinear.from_float(linear, spec, q=q, scale=scale, zero=zero))

    # torch's int4 CPU kernel is ~30x slower than dequantize-and-matmul on fp32 inputs: not for the replay
    kernels, QuantLinear.use_kernels = QuantLinear.use_kernels, False
    try:
        calibrate_layers(model, calib, solve, batch_size=cfg.batch_size, desc=f"gptq w{cfg.bits}")
    finally:
        QuantLinear.use_kernels = kernels
    model.llmlab_quant_method = "gptq"
    return model


@torch.no_grad()
def gptq(W: Tensor, H: Tensor, spec: QuantSpec, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False, name: str = "layer") -> tuple[Tensor, Tensor, Tensor]:
    """Quantize W (out, in) given the Hessian H (in, in): Ŵ float32 (out, in) on the grid, scale, zero (out, G)."""
    with one_thread():
        return _gptq(W, H, spec, damp, block_size, act_order, name)


@contextmanager
def one_thread():
    """The column loop runs thousands of tiny ops: extra threads only add a wait at each one (25x slower
    on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _gptq(W, H, spec, damp, block_size, act_order, name):
    W, H = W.detach().float().clone(), H.detach().float().clone()
    n_in = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = act_order or spec.group_size <= 0  # grids fitted once, up front, on the original columns
    if static:
        scale, zero = fit_grid(W, spec)  # (out, G) or (1, 1) per tensor
    else:
        scale = torch.zeros(W.shape[0], spec.n_groups(n_in), device=W.device)
        zero = torch.zeros_like(scale)
    perm = (torch.argsort(H.diagonal(), descending=True, stable=True) if act_order
            else torch.arange(n_in, device=W.device))
    W, H, order = W[:, perm], H[perm][:, perm], perm.tolist()  # order[j]: original index of column j
    U = inverse_cholesky(H, damp, name)  # (in, in) upper: row j = (H_F⁻¹)_{j,:} / √[H_F⁻¹]_jj
    Q = torch.zeros_like(W)
    gs = spec.group_for(n_in)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]  # the original index names the column's group
            g = col // gs if gs > 0 else 0
            if not static and col % gs == 0:
                cols = current_columns(W, W1, Err1, U, i1, i, gs)  # (out, gs)
                s, z = fit_grid(cols, QuantSpec(spec.bits, 0, spec.symmetric))
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            q = quantize_column(W1[:, i], scale[:, g], zero[:, g], spec.qmax)  # (out,)
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Q[:, i1 + i], Err1[:, i] = q, err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy update of everything after the block
    return Q[:, torch.argsort(perm)], scale, zero


def current_columns(W: Tensor, W1: Tensor, Err1: Tensor, U: Tensor, i1: int, i: int, gs: int) -> Tensor:
    """Columns i1+i … i1+i+gs of W with every error so far propagated: those inside the block are
    up to date in W1; those past the block still lack the block's pending update."""
    inside = W1[:, i:i + gs]
    end, i2 = i1 + i + gs, i1 + W1.shape[1]
    if end <= i2:
        return inside
    outside = W[:, i2:end] - Err1[:, :i] @ U[i1:i1 + i, i2:end]
    return torch.cat([inside, outside], dim=1)


def inverse_cholesky(H: Tensor, damp: float, name: str = "layer") -> Tensor:
    """U = chol((H + λI)⁻¹), upper, with λ = damp · mean(diag H)."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise LlmlabError(f"the Hessian of {name} is not positive definite even after dampening {damp}; "
                          "raise --damp (e.g. 0.1) or give more calibration text") from None

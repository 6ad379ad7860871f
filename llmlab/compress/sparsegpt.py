"""SparseGPT: massive language models can be accurately pruned in one shot.

Frantar & Alistarh 2023, https://arxiv.org/abs/2301.00774 — reference code:
https://github.com/IST-DASLab/sparsegpt

The layer-wise problem is GPTQ's with a mask instead of a grid (see gptq.py for the machinery):
with X (n, in) the calibration inputs and H = 2/n · XᵀX, find the sparse Ŵ that keeps X Ŵᵀ close
to X Wᵀ. Going through the columns j in order, Optimal Brain Surgeon removes w_j's pruned entries
and moves the not-yet-visited columns F to absorb the error (Algorithm 1):

    err = (w_j − m_j ⊙ w_j) / U_jj,      W_{:, j:} −= err · U_{j, j:}

where U = chol(H⁻¹) (upper) carries the downdated inverse Hessians of every F at once, exactly as
in GPTQ, and lazy blocks apply the updates beyond a block in one matmul. The mask m is chosen
*adaptively* (§3.3): every Bs columns (`mask_block`), on the current, already-updated weights, by
the OBS saliency

    ε_ij = w_ij² / [H_F⁻¹]_jj = w_ij² / U_jj²    (the paper's [H⁻¹]²_jj, with H⁻¹ its Cholesky factor)

dropping the lowest p% of the Bs-column block (one threshold over all rows), or for N:M the
lowest M − N of every M columns of each row, chosen when the loop reaches the group (§3.4).
`block_size` (the lazy batch) changes only speed; `mask_block` changes which weights are chosen.

`mask: wanda` fixes the mask up front by Wanda's score |W_ij|·‖X_j‖₂ (per output row, or per N:M
group) and keeps only SparseGPT's reconstruction of the surviving weights: the "Wanda + weight
update" ablation of Sun et al. 2023 (§5), which tells a mask's quality from the update's.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from llmlab.compress.calibrate import calibrate_layers, check_skip, layers_prefix, observe
from llmlab.compress.gptq import current_columns, inverse_cholesky, one_thread
from llmlab.compress.sparsity import PruneSpec, check_model, layer_targets, mask_for, matrix_mask, nm_mask, weight_of
from llmlab.compress.wanda import wanda_score
from llmlab.config import field
from llmlab.errors import LlmlabError

MASKS = ("obs", "wanda")


@dataclass
class SparseGPTConfig:
    sparsity: float | None = field(None, help="fraction of weights set to zero, in [0, 1); default 0.5, "
                                              "or 1 - N/M with a pattern")
    pattern: str = field("", help="N:M semi-structured pattern, e.g. 2:4 (2 nonzeros in every 4); empty: unstructured")
    damp: float = field(0.01, help="dampening: add damp * mean(diag H) to the Hessian's diagonal")
    mask_block: int = field(128, help="columns per adaptive mask selection (Bs of the paper); 0: one mask "
                                      "for the whole layer, chosen up front")
    block_size: int = field(128, help="columns per lazy-batch block (speed only: results do not depend on it)")
    mask: str = field("obs", help="obs: the paper's adaptive OBS-saliency mask; wanda: Wanda's mask, "
                                  "chosen up front, with SparseGPT's weight update")
    skip: list[str] = field([], help="regexes of full module names to leave dense")
    batch_size: int = field(8, help="calibration sequences per forward pass")

    def __post_init__(self):
        PruneSpec(self.sparsity, self.pattern)  # validates both
        if self.mask not in MASKS:
            raise LlmlabError(f"sparsegpt mask must be one of {', '.join(MASKS)}, got '{self.mask}'")
        if not 0 < self.damp <= 1:
            raise LlmlabError(f"sparsegpt damp must be in (0, 1], got {self.damp}; 0.01 is the usual value")
        for key in ("block_size", "batch_size"):
            if getattr(self, key) < 1:
                raise LlmlabError(f"sparsegpt {key} must be a positive integer, got {getattr(self, key)}")
        if self.mask_block < 0:
            raise LlmlabError(f"sparsegpt mask_block must be >= 0 (0: the whole layer), got {self.mask_block}")
        check_skip(self.skip)

    @property
    def spec(self) -> PruneSpec:
        return PruneSpec(self.sparsity, self.pattern)


@torch.no_grad()
def prune_sparsegpt(model, calib: Tensor | None, cfg: SparseGPTConfig | None = None):
    """Prune every decoder-layer linear of `model` in place with SparseGPT; returns the model."""
    cfg = cfg or SparseGPTConfig()
    if calib is None:
        raise LlmlabError("SparseGPT needs calibration text: give --calib FILE")
    spec = cfg.spec
    check_model(model, spec, cfg.skip)
    prefix = layers_prefix(model)

    def solve(index, layer, run):
        targets = layer_targets(layer, f"{prefix}.{index}", cfg.skip)
        with observe(targets) as stats:
            run()
        for name, module in targets.items():
            H = (2 / stats[name].n * stats[name].xtx).float()  # (in, in)
            W = weight_of(module)
            # Σ_tokens x_j² is XᵀX's diagonal: Wanda's score needs no second pass
            mask = mask_for(wanda_score(W, stats[name].xtx.diagonal()), spec) if cfg.mask == "wanda" else None
            W.copy_(sparsegpt(W, H, spec, cfg.damp, cfg.block_size, cfg.mask_block, f"{prefix}.{index}.{name}", mask))

    calibrate_layers(model, calib, solve, batch_size=cfg.batch_size, desc=f"sparsegpt {spec.describe()}")
    return model


@torch.no_grad()
def sparsegpt(W: Tensor, H: Tensor, spec: PruneSpec, damp: float = 0.01, block_size: int = 128,
              mask_block: int = 128, name: str = "layer", mask: Tensor | None = None) -> Tensor:
    """Prune W (out, in) given the Hessian H (in, in): the sparse, updated Ŵ, float32 (out, in).

    `mask` (out, in), True where a weight survives, replaces the adaptive selection.
    """
    with one_thread():
        return _sparsegpt(W, H, spec, damp, block_size, mask_block, name, mask)


def _sparsegpt(W, H, spec, damp, block_size, mask_block, name, mask=None):
    W, H = W.detach().float().clone(), H.detach().float().clone()
    n_in = W.shape[1]
    dead = H.diagonal() == 0  # an input never active in calibration: its column is zeroed, as in GPTQ
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_cholesky(H, damp, name)  # (in, in) upper: U_jj² = [H_F⁻¹]_jj when the loop reaches j
    d2 = U.diagonal().square()  # (in,)
    step = spec.nm[1] if spec.pattern else (mask_block or n_in)  # columns per mask selection
    keep = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.to(W.device)  # (out, in)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if mask is None and j % step == 0:  # choose the next mask on the weights as updated so far
                saliency = current_columns(W, W1, Err1, U, i1, i, step).square() / d2[j:j + step]
                keep[:, j:j + step] = (nm_mask(saliency, *spec.nm) if spec.pattern
                                       else matrix_mask(saliency, spec.ratio))
            q = W1[:, i] * keep[:, j]  # (out,)
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i], Err1[:, i] = q, err  # exact zeros, not w − err·U_jj
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy update of everything after the block
    return W

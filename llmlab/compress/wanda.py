"""Wanda: pruning by Weights AND Activations.

Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for Large Language Models",
https://arxiv.org/abs/2306.11695 — reference code: https://github.com/locuslab/wanda

With X (n_tokens, in) a linear layer's calibration inputs, each weight is scored by its magnitude
times the ℓ2 norm of the input feature it multiplies (eq. 1):

    S_ij = |W_ij| · ‖X_j‖₂

and the lowest scores are dropped *within each output row* (§3: comparing per output, not per
layer, is what makes it work on LLMs), or within each group of M for N:M. No weight update, no
Hessian: one forward pass per layer for the norms, so it is about as fast as magnitude pruning.
Layers are pruned one decoder layer at a time on the inputs of the already pruned layers before
them (the reference does the same), through the shared calibration scaffold.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from llmlab.compress.calibrate import calibrate_layers, check_skip, layers_prefix, observe
from llmlab.compress.sparsity import PruneSpec, apply_mask, check_model, layer_targets, mask_for, weight_of
from llmlab.config import field
from llmlab.errors import LlmlabError


@dataclass
class WandaConfig:
    sparsity: float | None = field(None, help="fraction of weights set to zero, in [0, 1); default 0.5, "
                                              "or 1 - N/M with a pattern")
    pattern: str = field("", help="N:M semi-structured pattern, e.g. 2:4 (2 nonzeros in every 4); empty: unstructured")
    skip: list[str] = field([], help="regexes of full module names to leave dense")
    batch_size: int = field(8, help="calibration sequences per forward pass")

    def __post_init__(self):
        PruneSpec(self.sparsity, self.pattern)  # validates both
        if self.batch_size < 1:
            raise LlmlabError(f"wanda batch_size must be a positive integer, got {self.batch_size}")
        check_skip(self.skip)

    @property
    def spec(self) -> PruneSpec:
        return PruneSpec(self.sparsity, self.pattern)


def wanda_score(W: Tensor, sq_sum: Tensor) -> Tensor:
    """S (out, in) = |W| · ‖X_j‖₂, from W (out, in) and Σ_tokens x_j² (in,)."""
    return W.abs().float() * sq_sum.sqrt().float()[None, :]


@torch.no_grad()
def prune_wanda(model, calib: Tensor | None, cfg: WandaConfig | None = None):
    """Prune every decoder-layer linear of `model` in place with Wanda; returns the model."""
    cfg = cfg or WandaConfig()
    if calib is None:
        raise LlmlabError("Wanda needs calibration text: give --calib FILE")
    spec = cfg.spec
    check_model(model, spec, cfg.skip)
    prefix = layers_prefix(model)

    def solve(index, layer, run):
        targets = layer_targets(layer, f"{prefix}.{index}", cfg.skip)
        with observe(targets, xtx=False) as stats:  # only Σx² per feature: no (in, in) products
            run()
        for name, module in targets.items():
            apply_mask(module, mask_for(wanda_score(weight_of(module), stats[name].sq_sum), spec))

    calibrate_layers(model, calib, solve, batch_size=cfg.batch_size, desc=f"wanda {spec.describe()}")
    return model

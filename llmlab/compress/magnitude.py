"""Magnitude pruning: drop the weights of smallest absolute value, the data-free baseline.

Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks",
https://arxiv.org/abs/1506.02626 — the baseline of SparseGPT (https://arxiv.org/abs/2301.00774)
and Wanda (https://arxiv.org/abs/2306.11695). For each linear layer W (out, in):

    score_ij = |W_ij|,      W_ij ← 0 for the lowest scores of each comparison group

The group is each output row by default (every row loses the same fraction, as Wanda compares),
or the whole layer (`scope: layer`, one threshold per matrix, the papers' magnitude baseline);
with an N:M pattern it is each run of M consecutive input weights. No calibration data: the
score ignores how large each weight's input is, which is why it breaks down on LLMs, whose few
outlier input features carry large activations (Wanda §3).
"""

from dataclasses import dataclass

import torch

from llmlab.compress.calibrate import check_skip
from llmlab.compress.sparsity import PruneSpec, apply_mask, check_model, mask_for, matrix_mask, prune_targets, weight_of
from llmlab.config import field
from llmlab.errors import LlmlabError


@dataclass
class MagnitudeConfig:
    sparsity: float | None = field(None, help="fraction of weights set to zero, in [0, 1); default 0.5, "
                                              "or 1 - N/M with a pattern")
    pattern: str = field("", help="N:M semi-structured pattern, e.g. 2:4 (2 nonzeros in every 4); empty: unstructured")
    scope: str = field("row", help="unstructured comparison group: row (each output row) or layer (whole matrix)")
    skip: list[str] = field([], help="regexes of full module names to leave dense")

    def __post_init__(self):
        PruneSpec(self.sparsity, self.pattern)  # validates both
        if self.scope not in ("row", "layer"):
            raise LlmlabError(f"magnitude scope must be 'row' or 'layer', got {self.scope!r}")
        if self.pattern and self.scope != "row":
            raise LlmlabError("magnitude scope 'layer' is for unstructured pruning; an N:M pattern compares "
                              "within each group of M: drop scope or pattern")
        check_skip(self.skip)

    @property
    def spec(self) -> PruneSpec:
        return PruneSpec(self.sparsity, self.pattern)


@torch.no_grad()
def prune_magnitude(model, calib=None, cfg: MagnitudeConfig | None = None):
    """Prune every decoder-layer linear of `model` in place by |W|; `calib` is not used. Returns the model."""
    cfg = cfg or MagnitudeConfig()
    spec = cfg.spec
    check_model(model, spec, cfg.skip)
    for module in prune_targets(model, cfg.skip).values():
        score = weight_of(module).abs().float()  # (out, in)
        keep = matrix_mask(score, spec.ratio) if cfg.scope == "layer" else mask_for(score, spec)
        apply_mask(module, keep)
    return model

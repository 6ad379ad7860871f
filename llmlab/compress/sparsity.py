"""Pruning masks shared by magnitude, Wanda and SparseGPT: which weights of a linear layer become zero.

A mask `keep` (out, in) is True where a weight survives. Every method scores the weights of a
layer's W (out, in) and drops the lowest scores within a *comparison group*:

- unstructured, per output row: each row loses ⌊p·in⌋ weights (Wanda's choice, §3 of
  Sun et al. 2023, https://arxiv.org/abs/2306.11695);
- unstructured, per block/layer: one threshold over a whole matrix (magnitude's classic baseline,
  and SparseGPT's adaptive mask selection over blocks of columns);
- semi-structured N:M: in every M consecutive input weights of a row, at most N are nonzero,
  so "2:4" keeps 2 of every 4 (50% sparsity), "4:8" keeps 4 of every 8. This is the pattern
  NVIDIA's sparse tensor cores execute (Mishra et al. 2021, "Accelerating Sparse Deep Neural
  Networks", https://arxiv.org/abs/2104.08378); its sparsity is 1 − N/M.

Pruned weights are stored as zeros in ordinary nn.Linear (or GPT-2 Conv1D) weights, so a pruned
model is a normal transformers model and any other stage (quantize, finetune, eval) takes it.
Only the linears inside the decoder layers are pruned; embeddings and lm_head stay dense.
"""

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from llmlab.compress.calibrate import layers_prefix, skipped
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers
from llmlab.models.packed.qlinear import quantized_linears
from llmlab.models.surgery import linear_weight


@dataclass
class PruneSpec:
    """What to prune: a sparsity for unstructured pruning, or an "N:M" pattern (sparsity 1 − N/M)."""
    sparsity: float | None = None  # None: 0.5 unstructured, or 1 − N/M with a pattern
    pattern: str = ""              # "" unstructured, else "N:M"

    def __post_init__(self):
        if self.sparsity is not None and not (isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise LlmlabError(f"sparsity must be in [0, 1), got {self.sparsity}; e.g. 0.5 sets half the weights to zero")
        if self.pattern:
            n, m = self.nm
            if self.sparsity is not None and not math.isclose(self.sparsity, 1 - n / m, abs_tol=1e-9):
                raise LlmlabError(f"pattern {self.pattern} keeps {n} of every {m} weights, sparsity {1 - n / m:g}, "
                                  f"not {self.sparsity:g}; drop sparsity or make them agree")

    @property
    def nm(self) -> tuple[int, int]:
        """(N, M) of the pattern: at most N nonzeros in every M consecutive input weights."""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", self.pattern)
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            raise LlmlabError(f"pattern must be 'N:M' with 1 <= N <= M (N nonzeros kept in every M weights, "
                              f"e.g. 2:4 or 4:8), got {self.pattern!r}")
        return int(match[1]), int(match[2])

    @property
    def ratio(self) -> float:
        """The fraction of weights set to zero."""
        if self.pattern:
            n, m = self.nm
            return 1 - n / m
        return 0.5 if self.sparsity is None else float(self.sparsity)

    def describe(self) -> str:
        return f"{self.pattern} ({self.ratio:.0%})" if self.pattern else f"{self.ratio:.0%} unstructured"


def n_pruned(count: int, sparsity: float) -> int:
    """⌊count · sparsity⌋ without float noise (0.29 · 100 is 28.999…)."""
    return math.floor(count * sparsity + 1e-6)


def row_mask(score: Tensor, sparsity: float) -> Tensor:
    """keep (out, in): each row drops its ⌊p·in⌋ lowest scores."""
    keep = torch.ones_like(score, dtype=torch.bool)
    k = n_pruned(score.shape[1], sparsity)
    if k:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


def matrix_mask(score: Tensor, sparsity: float) -> Tensor:
    """keep, the shape of score: the ⌊p·numel⌋ lowest scores of the whole matrix dropped (one threshold)."""
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    k = n_pruned(score.numel(), sparsity)
    if k:
        keep[score.flatten().topk(k, largest=False).indices] = False
    return keep.view(score.shape)


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """keep (out, in): the n highest scores of every m consecutive columns of each row; in % m == 0."""
    out, n_in = score.shape
    groups = score.reshape(out, n_in // m, m)  # (out, in/m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.view(out, n_in)


def mask_for(score: Tensor, spec: PruneSpec) -> Tensor:
    """keep (out, in) by the spec: N:M groups, or unstructured per output row."""
    return nm_mask(score, *spec.nm) if spec.pattern else row_mask(score, spec.ratio)


def weight_of(module: nn.Module) -> Tensor:
    """The (out, in) weight of an nn.Linear or a GPT-2 Conv1D, outside autograd: writes reach the layer."""
    return linear_weight(module).data


def layer_targets(layer: nn.Module, prefix: str, skip: list[str]) -> dict[str, nn.Module]:
    """The prunable linears of one decoder layer, by relative name; `prefix` makes the full name `skip` sees."""
    return {name: m for name, m in layer.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and not skipped(f"{prefix}.{name}", skip)}


def prune_targets(model, skip: list[str]) -> dict[str, nn.Module]:
    """Full name -> module for every linear that pruning would touch."""
    prefix = layers_prefix(model)
    return {f"{prefix}.{i}.{name}": m for i, layer in enumerate(decoder_layers(model))
            for name, m in layer_targets(layer, f"{prefix}.{i}", skip).items()}


def check_model(model, spec: PruneSpec, skip: list[str]) -> None:
    """Refuse, before anything changes: a quantized model, nothing to prune, or an M that does not divide a layer."""
    done = quantized_linears(model)
    if done:
        raise LlmlabError(f"{next(iter(done))} is quantized; prune the float model first, then quantize it")
    targets = prune_targets(model, skip)
    if not targets:
        raise LlmlabError("no linear layer left to prune: the skip patterns match every one; loosen --options.skip")
    if spec.pattern:
        _, m = spec.nm
        for name, module in targets.items():
            n_in = weight_of(module).shape[1]
            if n_in % m:
                raise LlmlabError(f"pattern {spec.pattern}: M={m} does not divide the in_features={n_in} of {name}; "
                                  "use an M that divides it (e.g. 2:4) or skip the layer")


def apply_mask(module: nn.Module, keep: Tensor) -> None:
    """Zero the weights where keep is False (the bias stays)."""
    weight_of(module).mul_(keep.to(module.weight.dtype))


def sparsity_report(model, skip: list[str] | None = None) -> dict:
    """Achieved sparsity: overall (zeros / weights over the pruned layers), min, max and per layer."""
    per_layer, zeros, total = {}, 0, 0
    for name, module in prune_targets(model, skip or []).items():
        w = module.weight.data
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    values = list(per_layer.values())
    return {"overall": zeros / max(total, 1), "min": min(values, default=0.0), "max": max(values, default=0.0),
            "zero_weights": zeros, "pruned_layer_weights": total, "per_layer": per_layer}

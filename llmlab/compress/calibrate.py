"""The calibration scaffold shared by every data-aware compression method (GPTQ, AWQ, SparseGPT, Wanda…).

GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323, §5 "Implementation details") compresses
a model one decoder layer at a time. With X_ℓ the inputs of layer ℓ on the calibration tokens:

    X_0 = inputs of layer 0 (captured once),  X_{ℓ+1} = layer_ℓ^compressed(X_ℓ)

so each layer is solved on the inputs the *already compressed* layers before it produce, and errors
do not compound unseen. Only one layer's activations are held at a time, in the model's dtype.

The scaffold knows nothing about any method: `calibrate_layers` hands each layer and a `run()` that
replays its inputs to the method's `solve`; the method registers hooks (`observe` collects input
statistics such as XᵀX), solves, swaps modules, and the scaffold re-runs the layer for the next one.
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from llmlab.data.text import read_text
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers
from llmlab.models.surgery import conv1d_as_linear, set_module


def calibration_data(tokenizer, source: str, n_samples: int = 128, seq_len: int = 512, seed: int = 0) -> Tensor:
    """(n_samples, seq_len) token ids: `source` (a text file, or the text itself) tokenized once, cut
    into `n_samples` windows at random non-overlapping offsets."""
    if n_samples < 1 or seq_len < 1:
        raise LlmlabError(f"calibration needs n_samples >= 1 and seq_len >= 1, got {n_samples} and {seq_len}")
    text = read_text(source) if _is_path(source) else source
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    need = n_samples * seq_len
    if len(ids) < need:
        raise LlmlabError(f"calibration text has {len(ids):,} tokens, fewer than n_samples x seq_len = "
                          f"{n_samples} x {seq_len} = {need:,}; give more text or lower --n-samples/--seq-len")
    # Spread the spare tokens as random gaps between the windows: non-overlapping by construction.
    gen = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, len(ids) - need + 1, (n_samples,), generator=gen).sort().values
    starts = gaps + torch.arange(n_samples) * seq_len
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def check_calibration_options(method: str, needs_calib: bool, calib: str | None, n_samples: int, seq_len: int):
    """A verb's calibration options, checked before any model is loaded."""
    if needs_calib and not calib:
        raise LlmlabError(f"--method {method} needs calibration text: give --calib FILE "
                          "(not the text you will evaluate on)")
    if n_samples < 1 or seq_len < 2:
        raise LlmlabError(f"--n-samples must be >= 1 and --seq-len >= 2, got {n_samples} and {seq_len}")


def _is_path(source: str) -> bool:
    """A file name rather than the text itself: one short line naming a file (or looking like a path)."""
    if "\n" in source or len(source) > 1024:
        return False
    if Path(source).is_file():
        return True
    if "/" in source or Path(source).suffix in (".txt", ".raw", ".md", ".jsonl"):
        raise LlmlabError(f"calibration file not found: {source}")
    return False


class _Captured(Exception):
    """Raised by the pre-hook on layer 0 to stop the forward once its inputs are held."""


@torch.no_grad()
def calibrate_layers(model, calib: Tensor, solve: Callable, *, batch_size: int = 8, progress: bool = True,
                     desc: str = "") -> None:
    """Compress `model` layer by layer: solve(index, layer, run) for each decoder layer.

    `run()` feeds every captured input batch through `layer` (so the method's hooks see them) and
    returns nothing; after `solve` returns, the layer (now compressed) is re-run to make the next
    layer's inputs.
    """
    if calib.ndim != 2 or calib.numel() == 0:
        raise LlmlabError(f"calibration ids must be a (n_samples, seq_len) tensor, got shape {tuple(calib.shape)}")
    if batch_size < 1:
        raise LlmlabError(f"calibration batch_size must be a positive integer, got {batch_size}")
    layers = decoder_layers(model)
    inputs = _capture_inputs(model, layers[0], calib, batch_size)  # [(hidden (B, T, d), args, kwargs)]
    for index, layer in enumerate(tqdm(layers, desc=desc or "calibrate", unit="layer", disable=not progress)):
        def run(layer=layer):
            for hidden, args, kwargs in inputs:
                layer(hidden, *args, **kwargs)

        solve(index, layer, run)
        for b, (hidden, args, kwargs) in enumerate(inputs):
            out = layer(hidden, *args, **kwargs)
            inputs[b] = (out[0] if isinstance(out, tuple) else out, args, kwargs)


def _capture_inputs(model, first: nn.Module, calib: Tensor, batch_size: int) -> list:
    """Layer 0's inputs for each batch: its hidden states and the other arguments the model passes
    (position embeddings, attention mask, position ids), with the KV cache off."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise _Captured

    device = next(model.parameters()).device
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


@dataclass
class InputStats:
    """Statistics of a linear's inputs x (flattened to (n, in)), filled by `observe`'s pre-hook."""
    n: int = 0                      # tokens seen
    xtx: Tensor | None = None       # (in, in) float64: Σ xᵀx
    sq_sum: Tensor | None = None    # (in,) float64: Σ x²  (‖X_j‖₂² per input feature)
    abs_sum: Tensor | None = None   # (in,) float64: Σ |x|
    abs_max: Tensor | None = None   # (in,) float32: max |x|

    def add(self, x: Tensor, xtx: bool) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (n, in)
        parts = _batch_stats(x, xtx)
        if self.n == 0:
            self.xtx, self.sq_sum, self.abs_sum, self.abs_max = parts
        else:
            if xtx:
                self.xtx += parts[0]
            self.sq_sum += parts[1]
            self.abs_sum += parts[2]
            self.abs_max = torch.maximum(self.abs_max, parts[3])
        self.n += x.shape[0]


def _batch_stats(x: Tensor, xtx: bool) -> tuple:
    # One batch's products in fp32 (fast kernels), summed across batches in fp64.
    return ((x.T @ x).double() if xtx else None, x.square().sum(0).double(), x.abs().sum(0).double(),
            x.abs().amax(0))


@contextmanager
def observe(linears: dict[str, nn.Module], xtx: bool = True) -> Iterator[dict[str, InputStats]]:
    """Collect InputStats of each module's input while the block runs inside the `with`.

    Linears that read the same tensor (q/k/v, gate/up) share one computation of its statistics.
    """
    stats = {name: InputStats() for name in linears}
    last = {}  # the last input seen and its statistics: q, k and v are called in a row with one tensor

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            if last.get("x") is not x:
                last["x"], last["n"] = x, InputStats()
                last["n"].add(x, xtx)
            _merge(stats[name], last["n"])
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        last.clear()


def _merge(into: InputStats, batch: InputStats) -> None:
    if into.n == 0:
        into.xtx, into.sq_sum, into.abs_sum, into.abs_max = (
            None if t is None else t.clone() for t in (batch.xtx, batch.sq_sum, batch.abs_sum, batch.abs_max))
    else:
        if batch.xtx is not None:
            into.xtx += batch.xtx
        into.sq_sum += batch.sq_sum
        into.abs_sum += batch.abs_sum
        into.abs_max = torch.maximum(into.abs_max, batch.abs_max)
    into.n += batch.n


def linears_of(layer: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear modules of one decoder layer by relative name, in definition order.

    GPT-2's Conv1D (a linear with a transposed weight) is first swapped for the equivalent
    nn.Linear, so every method sees one layout.
    """
    for name, module in list(layer.named_modules()):
        if isinstance(module, Conv1D):
            set_module(layer, name, conv1d_as_linear(module))
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def layers_prefix(model) -> str:
    """Qualified name of the decoder-layer stack ("model.layers", "transformer.h", …), for full module names."""
    stack = decoder_layers(model)
    return next(name for name, m in model.named_modules() if m is stack)


def skipped(name: str, patterns: list[str]) -> bool:
    """Whether a module's full name matches one of the user's `skip` regexes (left in float)."""
    return any(re.search(p, name) for p in patterns)


def check_skip(patterns: list[str]) -> None:
    """Config validation for `skip`: every entry must be a valid regex."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise LlmlabError(f"skip pattern {p!r} is not a valid regex ({e}); fix or remove it") from None

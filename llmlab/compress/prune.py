"""Prune a model with magnitude, Wanda, SparseGPT or LLM-Pruner by name: `prune_model`
(the verb is `llmlab prune`, llmlab/stages/prune.py).

    llmlab prune --model smollm2-135m --method wanda --sparsity 0.5 --calib FILE --out runs/w50
    llmlab prune --model smollm2-135m --method sparsegpt --pattern 2:4 --calib FILE --out runs/s24
    llmlab eval ppl --model runs/w50 --data FILE      # every verb loads the pruned folder
    llmlab quantize --model runs/w50 --method rtn …  # and pruning composes with quantization

The method is a name in the "prune" family of `llmlab.methods`, imported only when asked for. `--sparsity` is the
fraction of weights set to zero (for llm_pruner: of parameters removed, its `ratio`), `--pattern
N:M` keeps at most N nonzeros in every M consecutive input weights (sparsity 1 − N/M), and
`--options.KEY VALUE` sets any other option of the method's config (`llmlab prune --help`).
Methods that read data get `--n-samples` windows of `--seq-len` tokens of `--calib`.

Unstructured and N:M pruning leave zeros in ordinary weights, so the run folder's `model/` is a
plain transformers folder of the same size; the summary holds the achieved sparsity (overall,
min, max and per layer), the parameter count, the time taken and the peak resident memory.

From Python: `prune_model(model, "sparsegpt", calib_ids, pattern="2:4")`.
"""

from llmlab import methods
from llmlab.compress.sparsity import check_model as check_masks
from llmlab.config import build
from llmlab.errors import LlmlabError


def prune_method(name: str):
    """(config class, prune function, needs_calib) of a method, importing only its file."""
    cfg_cls, fn, entry = methods.load("prune", name)
    return cfg_cls, fn, entry.needs_calib


def prune_model(model, method: str, calib=None, **options):
    """prune_<method>(model, calib, <Method>Config(**options)), options checked; returns the model.

    `calib` is a (n_samples, seq_len) tensor of token ids (`calibrate.calibration_data`) for the
    methods that read data, and may be None for magnitude.
    """
    cfg_cls, prune, needs_calib = prune_method(method)
    cfg = build(cfg_cls, options, method)
    if needs_calib and calib is None:
        raise LlmlabError(f"{method} needs calibration data: pass calib=calibration_data(tokenizer, text)")
    check_model(model, cfg)
    return prune(model, calib, cfg)


def check_model(model, method_cfg) -> None:
    """The mask methods' checks (a quantized model, an M that does not divide a layer) before anything changes."""
    if hasattr(method_cfg, "spec") and hasattr(method_cfg, "skip"):
        check_masks(model, method_cfg.spec, method_cfg.skip)

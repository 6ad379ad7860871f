"""Quantize a model with any method of `llmlab.compress` by name: `quantize_model`, and what
`llmlab quantize` (llmlab/stages/quantize.py) reports about the result.

    llmlab quantize --model smollm2-135m --method gptq --bits 4 --group-size 64 --calib FILE --out runs/w4
    llmlab eval ppl --model runs/w4 --data FILE          # every verb loads the quantized folder
    llmlab quantize --model runs/lr90 --bits 4 --group-size 0 --out runs/lr90-w4    # a decomposed folder's factors
    llmlab quantize --bits 4 --group-size 64 --lorc-rank 8 --out runs/w4-lorc8      # + LoRC (lowrank.py)

The method is a name in the "quantize" family of `llmlab.methods`; --bits, --group-size
and --symmetric reach the methods that have them, and `--options.KEY VALUE` any other option of
the method's config (see `llmlab quantize --help`). Methods that read data get `--n-samples`
windows of `--seq-len` tokens of the `--calib` text. The run folder holds the quantized model in
`model/` (which `load_model(<run folder>)` finds), and the registry the size on disk, the time
taken and the peak resident memory. `--lorc-rank k` then adds LoRC (ZeroQuant-V2): beside each
quantized layer, the rank-k part of its error against the float model, kept in float.

From Python: `quantize_model(model, "gptq", calib_ids, bits=4, group_size=64)`.
"""

from pathlib import Path

from llmlab import methods
from llmlab.compress.rtn import rtn_targets
from llmlab.config import build
from llmlab.errors import LlmlabError
from llmlab.models.packed.qlinear import quantized_linears


def get_method(name: str):
    """(config class, quantize function, needs_calib) of a method, importing only its file."""
    cfg_cls, fn, entry = methods.load("quantize", name)
    return cfg_cls, fn, entry.needs_calib


def quantize_model(model, method: str, calib=None, **options):
    """quantize_<method>(model, calib, <Method>Config(**options)), options checked; returns the model.

    `calib` is a (n_samples, seq_len) tensor of token ids (`calibrate.calibration_data`) for the
    methods that read data, and may be None for the others.
    """
    cfg_cls, quantize, needs_calib = get_method(method)
    cfg = build(cfg_cls, options, method)
    if needs_calib and calib is None:
        raise LlmlabError(f"{method} needs calibration data: pass calib=calibration_data(tokenizer, text)")
    check_model(model, cfg)
    model = quantize(model, calib, cfg)
    model.llmlab_quant_method = method
    return model


def check_model(model, cfg):
    """Refuse, before anything changes, an already quantized model or a group size some layer cannot take."""
    done = quantized_linears(model)
    if done:
        name, module = next(iter(done.items()))
        raise LlmlabError(f"{name} is already quantized ({module.kind}, {module.config()}); "
                          "quantize the float model instead")
    if hasattr(cfg, "spec") and hasattr(cfg, "skip"):  # the methods on quant.py's grid: group sizes too
        rtn_targets(model, cfg)


COMMON = ("bits", "group_size", "symmetric")  # options most methods share, given as top-level flags


def grid_options(method_cfg) -> dict:
    """The grid options a method has (bits, group size, symmetric), for reports."""
    return {key: getattr(method_cfg, key) for key in COMMON if hasattr(method_cfg, key)}


def state_bytes(model) -> int:
    """Bytes of the model's tensors (parameters and buffers), a tied tensor counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())

"""`llmlab quantize`: quantize a model with any method of `llmlab.compress` and save it, packed.

    llmlab quantize --model smollm2-135m --method gptq --bits 4 --group-size 64 --calib FILE --out runs/w4
    llmlab eval ppl --model runs/w4 --data FILE          # every verb loads the quantized folder
    llmlab quantize --model runs/lr90 --bits 4 --group-size 0 --out runs/lr90-w4    # a decomposed folder's factors
    llmlab quantize --bits 4 --group-size 64 --lorc-rank 8 --out runs/w4-lorc8      # + LoRC (lowrank.py)

The method is a name in the METHODS table of `llmlab/compress/__init__.py`; --bits, --group-size
and --symmetric reach the methods that have them, and `--options.KEY VALUE` any other option of
the method's config (see `llmlab quantize --help`). Methods that read data get `--n-samples`
windows of `--seq-len` tokens of the `--calib` text. The run folder holds the quantized model in
`model/` (which `load_model(<run folder>)` finds), and the registry the size on disk, the time
taken and the peak resident memory. `--lorc-rank k` then adds LoRC (ZeroQuant-V2): beside each
quantized layer, the rank-k part of its error against the float model, kept in float.

From Python: `quantize_model(model, "gptq", calib_ids, bits=4, group_size=64)`.
"""

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from llmlab.compress import METHODS, get_method
from llmlab.compress.io import save_quantized
from llmlab.compress.lowrank import add_lorc
from llmlab.compress.qlinear import quantized_linears
from llmlab.compress.rtn import rtn_targets
from llmlab.config import build, field
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.runs import RunOptions, start_run

log = logging.getLogger("llmlab")

COMMON = ("bits", "group_size", "symmetric")  # options most methods share, given as top-level flags


@dataclasses.dataclass
class QuantizeConfig:
    model: str = field("smollm2-135m", help="model spec: built-in name, folder, .gguf, run folder or hub id")
    method: str = field("rtn", help=", ".join(METHODS))
    bits: int | None = field(None, help="bits per weight (default: the method's)")
    group_size: int | None = field(None, help="input columns per group; 0 per channel, -1 per tensor "
                                              "(default: the method's)")
    symmetric: bool | None = field(None, help="true: symmetric grid, false: min/max (default: the method's)")
    calib: str | None = field(None, help="calibration text file, for the methods that read data")
    n_samples: int = field(128, help="calibration windows")
    seq_len: int = field(512, help="tokens per calibration window")
    seed: int = field(0, help="seed that picks the calibration windows")
    options: dict[str, Any] = field({}, help="the method's other options, e.g. --options.damp 0.1")
    lorc_rank: int | None = field(None, help="after quantizing, add LoRC: each layer's rank-k float correction "
                                             "of its quantization error")
    dtype: str = field("fp32", help="dtype the model is loaded and quantized in: fp32, bf16 or fp16")
    device: str = field("cpu", help="cpu, cuda or auto")

    @staticmethod
    def more_help() -> str:
        """Each method's options, for `llmlab quantize --help`."""
        from llmlab.config import describe

        lines = ["", "", "options of each --method (--bits/--group-size/--symmetric or --options.KEY VALUE):"]
        for name in METHODS:
            try:
                cfg_cls, _, needs_calib = get_method(name)
            except LlmlabError:
                lines.append(f"  {name}: (not available)")
                continue
            rows = "; ".join(f"{opt} [{default}]" for opt, default, _ in describe(cfg_cls, "options.")) or "(none)"
            lines.append(f"  {name}{' (needs --calib)' if needs_calib else ''}: {rows}")
        return "\n".join(lines)

    def __post_init__(self):
        cfg_cls, _, needs_calib = get_method(self.method)
        if needs_calib and not self.calib:
            raise LlmlabError(f"--method {self.method} needs calibration text: give --calib FILE "
                              "(not the text you will evaluate on)")
        if self.n_samples < 1 or self.seq_len < 2:
            raise LlmlabError(f"--n-samples must be >= 1 and --seq-len >= 2, got {self.n_samples} and {self.seq_len}")
        if self.lorc_rank is not None and self.lorc_rank < 1:
            raise LlmlabError(f"--lorc-rank must be at least 1, got {self.lorc_rank}")
        self.method_config()  # fail on a bad option before loading anything

    def method_config(self):
        """The method's <Name>Config from --bits/--group-size/--symmetric and --options.*."""
        cfg_cls, _, _ = get_method(self.method)
        names = {f.name for f in dataclasses.fields(cfg_cls)}
        options = {str(k).replace("-", "_"): v for k, v in self.options.items()}
        for key in COMMON:
            value = getattr(self, key)
            if value is None:
                continue
            flag = "--" + key.replace("_", "-")
            if key not in names:
                raise LlmlabError(f"{flag} does not apply to --method {self.method}; its options are "
                                  f"{', '.join(sorted(names)) or 'none'}")
            if key in options and options[key] != value:
                raise LlmlabError(f"{flag} {value} and --options.{key} {options[key]} disagree; give one")
            options[key] = value
        return build(cfg_cls, options, "options")


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


def quantize_verb(cfg: QuantizeConfig, opts: RunOptions) -> dict:
    from llmlab.train.loop import memory_stats

    method_cfg = cfg.method_config()
    _, quantize, needs_calib = get_method(cfg.method)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    calib = _calibration(cfg, tokenizer) if needs_calib else None
    if cfg.calib and not needs_calib:
        log.info("--method %s needs no calibration data: --calib is not used", cfg.method)
    check_model(model, method_cfg)  # errors before the run folder exists: nothing half-written
    float_bytes = state_bytes(model)
    with start_run("quantize", cfg, opts) as run:
        with memory_stats(next(model.parameters()).device) as memory:
            start = time.perf_counter()
            reference = copy.deepcopy(model) if cfg.lorc_rank else None  # LoRC's W, beside the quantized Ŵ
            quantize(model, calib, method_cfg)
            if reference is not None:
                add_lorc(model, reference, cfg.lorc_rank)
                del reference
            seconds = time.perf_counter() - start
        saved = save_quantized(model, tokenizer, run.artifact("model"), method=cfg.method)
        result = {"model": cfg.model, "method": cfg.method, **_grid(method_cfg), "lorc_rank": cfg.lorc_rank,
                  "quantized_layers": len(quantized_linears(model)), "float_bytes": float_bytes,
                  "model_bytes": state_bytes(model), "size_on_disk_bytes": folder_bytes(saved),
                  "seconds": round(seconds, 2), **memory, "saved": str(saved)}
        run.log_metrics(**result)
        summary = run.finish(result)
    lorc = f" + LoRC rank {cfg.lorc_rank}" if cfg.lorc_rank else ""
    print(f"quantized {cfg.model} with {cfg.method} ({_describe(method_cfg)}){lorc} in {seconds:.1f} s: "
          f"{result['quantized_layers']} layers, weights {float_bytes / 2**20:.1f} MiB -> "
          f"{result['model_bytes'] / 2**20:.1f} MiB, peak RSS {memory['peak_rss_mb']:.0f} MiB -> {saved}")
    return summary


def _calibration(cfg: QuantizeConfig, tokenizer):
    from llmlab.compress.calibrate import calibration_data

    return calibration_data(tokenizer, cfg.calib, n_samples=cfg.n_samples, seq_len=cfg.seq_len, seed=cfg.seed)


def _grid(method_cfg) -> dict:
    return {key: getattr(method_cfg, key) for key in COMMON if hasattr(method_cfg, key)}


def _describe(method_cfg) -> str:
    grid = _grid(method_cfg)
    parts = [f"w{grid['bits']}"] if "bits" in grid else []
    if grid.get("group_size", 0) > 0:
        parts.append(f"g{grid['group_size']}")
    return " ".join(parts) or type(method_cfg).__name__


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

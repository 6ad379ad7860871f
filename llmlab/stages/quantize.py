"""`llmlab quantize`: quantize a model with any method of the "quantize" family and save it, packed.

    llmlab quantize --model smollm2-135m --method gptq --bits 4 --group-size 64 --calib FILE --out runs/w4
    llmlab eval ppl --model runs/w4 --data FILE          # every verb loads the quantized folder
    llmlab quantize --model runs/lr90 --bits 4 --group-size 0 --out runs/lr90-w4    # a decomposed folder's factors
    llmlab quantize --bits 4 --group-size 64 --lorc-rank 8 --out runs/w4-lorc8      # + LoRC (compress/lowrank.py)
"""

import copy
import dataclasses
import logging
import time
from typing import Any

from llmlab import methods
from llmlab.compress.calibrate import calibration_data, check_calibration_options
from llmlab.compress.lowrank import add_lorc
from llmlab.compress.quantize import COMMON, check_model, folder_bytes, get_method, grid_options, state_bytes
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.load import ModelOptions
from llmlab.models.packed.io import save_quantized
from llmlab.models.packed.qlinear import quantized_linears
from llmlab.runs import RunOptions, start_run
from llmlab.train.loop import memory_stats

log = logging.getLogger("llmlab")


@dataclasses.dataclass
class QuantizeConfig(ModelOptions):
    method: str = field("rtn", help=", ".join(methods.names("quantize")))
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

    @staticmethod
    def more_help() -> str:
        """Each method's options, for `llmlab quantize --help`."""
        return ("\n\noptions of each --method (--bits/--group-size/--symmetric or --options.KEY VALUE):\n"
                + methods.options_help("quantize"))

    def __post_init__(self):
        _, _, needs_calib = get_method(self.method)
        check_calibration_options(self.method, needs_calib, self.calib, self.n_samples, self.seq_len)
        if self.lorc_rank is not None and self.lorc_rank < 1:
            raise LlmlabError(f"--lorc-rank must be at least 1, got {self.lorc_rank}")
        self.method_config()  # fail on a bad option before loading anything

    def method_config(self):
        """The method's <Name>Config from --bits/--group-size/--symmetric and --options.*."""
        flags = {key.replace("_", "-"): (key, getattr(self, key)) for key in COMMON}
        return methods.build_options("quantize", self.method, self.options, flags)


def quantize_verb(cfg: QuantizeConfig, opts: RunOptions) -> dict:
    method_cfg = cfg.method_config()
    _, quantize, needs_calib = get_method(cfg.method)
    model, tokenizer = cfg.load_model()
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
        result = {"model": cfg.model, "method": cfg.method, **grid_options(method_cfg),
                  "group_sizes_used": _groups_used(model), "lorc_rank": cfg.lorc_rank,
                  "quantized_layers": len(quantized_linears(model)), "float_bytes": float_bytes,
                  "model_bytes": state_bytes(model), "size_on_disk_bytes": folder_bytes(saved),
                  "seconds": round(seconds, 2), **memory, "saved": str(saved)}
        run.log_metrics(**result)
        summary = run.finish(result)
    for width, group in result["group_sizes_used"].items():
        log.info("group size %s does not divide the %s-wide layers: they use groups of %s (the largest divisor "
                 "below it)", grid_options(method_cfg).get("group_size"), width, group)
    lorc = f" + LoRC rank {cfg.lorc_rank}" if cfg.lorc_rank else ""
    print(f"quantized {cfg.model} with {cfg.method} ({_describe(method_cfg)}){lorc} in {seconds:.1f} s: "
          f"{result['quantized_layers']} layers, weights {float_bytes / 2**20:.1f} MiB -> "
          f"{result['model_bytes'] / 2**20:.1f} MiB, peak RSS {memory['peak_rss_mb']:.0f} MiB -> {saved}")
    return summary


def _groups_used(model) -> dict[int, int]:
    """in_features -> the group size used, for the layer widths the asked-for group size does not divide."""
    used = {}
    for layer in quantized_linears(model).values():
        spec = getattr(layer, "spec", None)
        if spec is not None and spec.group_size > 0 and spec.group_for(layer.in_features) != spec.group_size:
            used[layer.in_features] = spec.group_for(layer.in_features)
    return dict(sorted(used.items()))


def _calibration(cfg: QuantizeConfig, tokenizer):
    return calibration_data(tokenizer, cfg.calib, n_samples=cfg.n_samples, seq_len=cfg.seq_len, seed=cfg.seed)


def _describe(method_cfg) -> str:
    grid = grid_options(method_cfg)
    parts = [f"w{grid['bits']}"] if "bits" in grid else []
    if grid.get("group_size", 0) > 0:
        parts.append(f"g{grid['group_size']}")
    return " ".join(parts) or type(method_cfg).__name__

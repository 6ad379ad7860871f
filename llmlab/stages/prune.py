"""`llmlab prune`: prune a model with any method of the "prune" family and save it.

    llmlab prune --model smollm2-135m --method wanda --sparsity 0.5 --calib FILE --out runs/w50
    llmlab prune --model smollm2-135m --method sparsegpt --pattern 2:4 --calib FILE --out runs/s24
"""

import dataclasses
import logging
import time
from typing import Any

from llmlab import methods
from llmlab.compress.calibrate import calibration_data, check_calibration_options
from llmlab.compress.prune import check_model, prune_method
from llmlab.models.surgery import count_parameters
from llmlab.compress.sparsity import sparsity_report
from llmlab.config import field
from llmlab.models import save_model
from llmlab.models.load import ModelOptions
from llmlab.runs import RunOptions, start_run
from llmlab.train.loop import memory_stats

log = logging.getLogger("llmlab")


@dataclasses.dataclass
class PruneConfig(ModelOptions):
    method: str = field("wanda", help=", ".join(methods.names("prune")))
    sparsity: float | None = field(None, help="fraction of weights set to zero, in [0, 1) (llm_pruner: of "
                                              "parameters removed); default: the method's (0.5)")
    pattern: str = field("", help="N:M semi-structured sparsity, e.g. 2:4 (2 nonzeros in every 4 weights); "
                                  "empty: unstructured")
    calib: str | None = field(None, help="calibration text file, for the methods that read data")
    n_samples: int = field(128, help="calibration windows")
    seq_len: int = field(512, help="tokens per calibration window")
    seed: int = field(0, help="seed that picks the calibration windows")
    options: dict[str, Any] = field({}, help="the method's other options, e.g. --options.damp 0.1")

    @staticmethod
    def more_help() -> str:
        """Each method's options, for `llmlab prune --help`."""
        return ("\n\noptions of each --method (--sparsity/--pattern or --options.KEY VALUE):\n"
                + methods.options_help("prune"))

    def __post_init__(self):
        _, _, needs_calib = prune_method(self.method)
        check_calibration_options(self.method, needs_calib, self.calib, self.n_samples, self.seq_len)
        self.method_config()  # fail on a bad option before loading anything

    def method_config(self):
        """The method's <Name>Config from --sparsity/--pattern and --options.*."""
        flags = {"sparsity": (methods.entry("prune", self.method).extra["sparsity_key"], self.sparsity),
                 "pattern": ("pattern", self.pattern or None)}
        return methods.build_options("prune", self.method, self.options, flags)


def prune_verb(cfg: PruneConfig, opts: RunOptions) -> dict:
    method_cfg = cfg.method_config()
    _, prune, needs_calib = prune_method(cfg.method)
    model, tokenizer = cfg.load_model()
    check_model(model, method_cfg)  # errors before the run folder exists: nothing half-written
    calib = (calibration_data(tokenizer, cfg.calib, n_samples=cfg.n_samples, seq_len=cfg.seq_len, seed=cfg.seed)
             if needs_calib else None)
    if cfg.calib and not needs_calib:
        log.info("--method %s needs no calibration data: --calib is not used", cfg.method)
    dense_params = count_parameters(model)
    with start_run("prune", cfg, opts) as run:
        with memory_stats(next(model.parameters()).device) as memory:
            start = time.perf_counter()
            model = prune(model, calib, method_cfg)
            seconds = time.perf_counter() - start
        saved = save_model(model, tokenizer, run.artifact("model"))
        achieved = sparsity_report(model)
        result = {"model": cfg.model, "method": cfg.method, "target": _target(method_cfg),
                  "sparsity": round(achieved["overall"], 6), "sparsity_min": round(achieved["min"], 6),
                  "sparsity_max": round(achieved["max"], 6), "zero_weights": achieved["zero_weights"],
                  "pruned_layer_weights": achieved["pruned_layer_weights"], "dense_params": dense_params,
                  "params": count_parameters(model), "nonzero_params": count_parameters(model, nonzero=True),
                  "seconds": round(seconds, 2), **memory, "saved": str(saved),
                  "per_layer_sparsity": {k: round(v, 6) for k, v in achieved["per_layer"].items()}}
        run.log_metrics(**{k: v for k, v in result.items() if k != "per_layer_sparsity"})
        summary = run.finish(result)
    print(f"pruned {cfg.model} with {cfg.method} ({result['target']}) in {seconds:.1f} s: sparsity "
          f"{achieved['overall']:.2%} of the decoder linears (per layer {achieved['min']:.2%}..{achieved['max']:.2%}), "
          f"params {dense_params:,} -> {result['params']:,} ({result['nonzero_params']:,} nonzero), "
          f"peak RSS {memory['peak_rss_mb']:.0f} MiB -> {saved}")
    return summary


def _target(method_cfg) -> str:
    if hasattr(method_cfg, "spec"):
        return method_cfg.spec.describe()
    ratio = getattr(method_cfg, "ratio", None)
    return f"{ratio:.0%} of parameters" if ratio is not None else type(method_cfg).__name__

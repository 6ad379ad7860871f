"""`llmlab prune`: prune a model with magnitude, Wanda, SparseGPT or LLM-Pruner and save it.

    llmlab prune --model smollm2-135m --method wanda --sparsity 0.5 --calib FILE --out runs/w50
    llmlab prune --model smollm2-135m --method sparsegpt --pattern 2:4 --calib FILE --out runs/s24
    llmlab eval ppl --model runs/w50 --data FILE      # every verb loads the pruned folder
    llmlab quantize --model runs/w50 --method rtn …  # and pruning composes with quantization

The method is a name in PRUNE_METHODS below, imported only when asked for. `--sparsity` is the
fraction of weights set to zero (for llm_pruner: of parameters removed, its `ratio`), `--pattern
N:M` keeps at most N nonzeros in every M consecutive input weights (sparsity 1 − N/M), and
`--options.KEY VALUE` sets any other option of the method's config (`llmlab prune --help`).
Methods that read data get `--n-samples` windows of `--seq-len` tokens of `--calib`.

Unstructured and N:M pruning leave zeros in ordinary weights, so the run folder's `model/` is a
plain transformers folder of the same size; the summary holds the achieved sparsity (overall,
min, max and per layer), the parameter count, the time taken and the peak resident memory.

From Python: `prune_model(model, "sparsegpt", calib_ids, pattern="2:4")`.
"""

import dataclasses
import logging
import time
from typing import Any, NamedTuple

from llmlab.config import build, field
from llmlab.errors import LlmlabError
from llmlab.runs import RunOptions, start_run

log = logging.getLogger("llmlab")


class PruneEntry(NamedTuple):
    module: str          # llmlab.compress.<module>
    config: str          # its <Name>Config dataclass
    function: str        # prune_<name>(model, calib, cfg) -> model
    needs_calib: bool    # whether it reads calibration text
    sparsity_key: str    # the config field that --sparsity sets


# `llmlab prune --method NAME` and `prune_model(model, NAME, …)` dispatch through this table.
PRUNE_METHODS: dict[str, PruneEntry] = {
    "magnitude": PruneEntry("magnitude", "MagnitudeConfig", "prune_magnitude", False, "sparsity"),
    "wanda": PruneEntry("wanda", "WandaConfig", "prune_wanda", True, "sparsity"),
    "sparsegpt": PruneEntry("sparsegpt", "SparseGPTConfig", "prune_sparsegpt", True, "sparsity"),
    "llm_pruner": PruneEntry("llm_pruner", "LLMPrunerConfig", "prune_llm_pruner", True, "ratio"),
}


def prune_method(name: str):
    """(config class, prune function, needs_calib) of a method, importing only its file."""
    from llmlab.compress import import_entry

    return (*import_entry("pruning", name, PRUNE_METHODS), PRUNE_METHODS[name].needs_calib)


@dataclasses.dataclass
class PruneConfig:
    model: str = field("smollm2-135m", help="model spec: built-in name, folder, .gguf, run folder or hub id")
    method: str = field("wanda", help=", ".join(PRUNE_METHODS))
    sparsity: float | None = field(None, help="fraction of weights set to zero, in [0, 1) (llm_pruner: of "
                                              "parameters removed); default: the method's (0.5)")
    pattern: str = field("", help="N:M semi-structured sparsity, e.g. 2:4 (2 nonzeros in every 4 weights); "
                                  "empty: unstructured")
    calib: str | None = field(None, help="calibration text file, for the methods that read data")
    n_samples: int = field(128, help="calibration windows")
    seq_len: int = field(512, help="tokens per calibration window")
    seed: int = field(0, help="seed that picks the calibration windows")
    options: dict[str, Any] = field({}, help="the method's other options, e.g. --options.damp 0.1")
    dtype: str = field("fp32", help="dtype the model is loaded and pruned in: fp32, bf16 or fp16")
    device: str = field("cpu", help="cpu, cuda or auto")

    @staticmethod
    def more_help() -> str:
        """Each method's options, for `llmlab prune --help`."""
        from llmlab.config import describe

        lines = ["", "", "options of each --method (--sparsity/--pattern or --options.KEY VALUE):"]
        for name in PRUNE_METHODS:
            try:
                cfg_cls, _, needs_calib = prune_method(name)
            except LlmlabError:
                lines.append(f"  {name}: (not available)")
                continue
            rows = "; ".join(f"{opt} [{default}]" for opt, default, _ in describe(cfg_cls, "options.")) or "(none)"
            lines.append(f"  {name}{' (needs --calib)' if needs_calib else ''}: {rows}")
        return "\n".join(lines)

    def __post_init__(self):
        _, _, needs_calib = prune_method(self.method)
        if needs_calib and not self.calib:
            raise LlmlabError(f"--method {self.method} needs calibration text: give --calib FILE "
                              "(not the text you will evaluate on)")
        if self.n_samples < 1 or self.seq_len < 2:
            raise LlmlabError(f"--n-samples must be >= 1 and --seq-len >= 2, got {self.n_samples} and {self.seq_len}")
        self.method_config()  # fail on a bad option before loading anything

    def method_config(self):
        """The method's <Name>Config from --sparsity/--pattern and --options.*."""
        cfg_cls, _, _ = prune_method(self.method)
        names = {f.name for f in dataclasses.fields(cfg_cls)}
        options = {str(k).replace("-", "_"): v for k, v in self.options.items()}
        flags = {"sparsity": (PRUNE_METHODS[self.method].sparsity_key, self.sparsity),
                 "pattern": ("pattern", self.pattern or None)}
        for flag, (key, value) in flags.items():
            if value is None:
                continue
            if key not in names:
                raise LlmlabError(f"--{flag} does not apply to --method {self.method}; its options are "
                                  f"{', '.join(sorted(names)) or 'none'}")
            if key in options and options[key] != value:
                raise LlmlabError(f"--{flag} {value} and --options.{key} {options[key]} disagree; give one")
            options[key] = value
        return build(cfg_cls, options, "options")


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
        from llmlab.compress.sparsity import check_model as check

        check(model, method_cfg.spec, method_cfg.skip)


def prune_verb(cfg: PruneConfig, opts: RunOptions) -> dict:
    from llmlab.compress.calibrate import calibration_data
    from llmlab.compress.sparsity import sparsity_report
    from llmlab.models import load_model, save_model
    from llmlab.train.loop import memory_stats

    method_cfg = cfg.method_config()
    _, prune, needs_calib = prune_method(cfg.method)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    check_model(model, method_cfg)  # errors before the run folder exists: nothing half-written
    calib = (calibration_data(tokenizer, cfg.calib, n_samples=cfg.n_samples, seq_len=cfg.seq_len, seed=cfg.seed)
             if needs_calib else None)
    if cfg.calib and not needs_calib:
        log.info("--method %s needs no calibration data: --calib is not used", cfg.method)
    dense_params = n_params(model)
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
                  "params": n_params(model), "nonzero_params": n_params(model, nonzero=True),
                  "seconds": round(seconds, 2), **memory, "saved": str(saved),
                  "per_layer_sparsity": {k: round(v, 6) for k, v in achieved["per_layer"].items()}}
        run.log_metrics(**{k: v for k, v in result.items() if k != "per_layer_sparsity"})
        summary = run.finish(result)
    print(f"pruned {cfg.model} with {cfg.method} ({result['target']}) in {seconds:.1f} s: sparsity "
          f"{achieved['overall']:.2%} of the decoder linears (per layer {achieved['min']:.2%}..{achieved['max']:.2%}), "
          f"params {dense_params:,} -> {result['params']:,}, peak RSS {memory['peak_rss_mb']:.0f} MiB -> {saved}")
    return summary


def _target(method_cfg) -> str:
    if hasattr(method_cfg, "spec"):
        return method_cfg.spec.describe()
    ratio = getattr(method_cfg, "ratio", None)
    return f"{ratio:.0%} of parameters" if ratio is not None else type(method_cfg).__name__


def n_params(model, nonzero: bool = False) -> int:
    """Parameters of the model, a tied tensor counted once; with nonzero, only the nonzero entries."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += int((p != 0).sum()) if nonzero else p.numel()
    return total

"""`llmlab eval harness`: any lm-evaluation-harness task on any llmlab model, adapters included.

    llmlab eval harness --tasks arc_easy,hellaswag --model runs/lora/model --limit 200
    llmlab eval harness --tasks my_task --include-path tasks/ --adapter math=runs/lora/adapter

The model is lm-eval's "llmlab" model (llmlab/evaluate/lm_eval_adapter.py): llmlab's loader, its
shared-prefix multiple-choice scorer and its decoding loop behind lm-eval's prompts and metrics.
The run folder holds lm-eval's results (results.json) and the registry one row with each task's
metrics. lm-eval is an optional dependency (`pip install 'llmlab[eval]'`); its tasks download their
datasets from the Hugging Face hub unless a task YAML (--include-path) points at local files.
"""

import json
import time
from dataclasses import dataclass

from llmlab.atomic import atomic_write
from llmlab.config import field
from llmlab.errors import LlmlabError, closest
from llmlab.models.load import ModelOptions
from llmlab.runs import RunOptions, start_run


@dataclass
class HarnessConfig(ModelOptions):
    tasks: list[str] = field([], help="lm-eval task or group names, comma-separated (e.g. arc_easy,hellaswag)")
    adapter: list[str] = field([], help="adapters to load onto the model, PATH or NAME=PATH; the first is active")
    num_fewshot: int | None = field(None, help="few-shot examples per question (default: each task's own)")
    limit: int | None = field(None, help="score at most this many documents of each task")
    batch_size: int = field(16, help="questions scored per forward pass")
    include_path: str | None = field(None, help="a folder of your own task YAMLs, added to lm-eval's")
    bootstrap_iters: int = field(0, help="bootstrap resamples for standard errors (lm-eval's default is 100000)")
    seed: int = field(1234, help="seed of few-shot sampling and of any sampled generation (lm-eval's default)")

    def __post_init__(self):
        if not self.tasks:
            raise LlmlabError("--tasks is required: lm-eval task names, e.g. --tasks arc_easy,hellaswag")
        if self.limit is not None and self.limit < 1:
            raise LlmlabError(f"--limit must be at least 1, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise LlmlabError(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")


def harness_verb(cfg: HarnessConfig, opts: RunOptions) -> dict:
    lm_eval, task_manager = _lm_eval(cfg)
    from llmlab.evaluate.lm_eval_adapter import LlmlabLM  # registers lm-eval's "llmlab" model

    model = LlmlabLM(model=cfg.model, adapter=";".join(cfg.adapter), dtype=cfg.dtype, device=cfg.device,
                     batch_size=cfg.batch_size)
    with start_run("eval harness", cfg, opts) as run:
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(model=model, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                      limit=cfg.limit, task_manager=task_manager,
                                      bootstrap_iters=cfg.bootstrap_iters, random_seed=cfg.seed,
                                      numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                      fewshot_random_seed=cfg.seed)
        seconds = time.perf_counter() - start
        results = {task: _metrics(values) for task, values in out["results"].items()}
        atomic_write(run.artifact("results.json"), json.dumps(
            {"results": out["results"], "configs": out.get("configs", {}), "n-samples": out.get("n-samples", {})},
            indent=2, default=str, ensure_ascii=False) + "\n")
        run.log_metrics(**{f"{task}/{name}": value for task, metrics in results.items()
                           for name, value in metrics.items()})
        summary = run.finish({"model": cfg.model, "adapter": cfg.adapter, "tasks": results, "limit": cfg.limit,
                              "num_fewshot": cfg.num_fewshot, "seconds": round(seconds, 1)})
    width = max(map(len, results)) + 2
    for task, metrics in results.items():
        print(f"  {task:<{width}}" + "  ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    print(f"lm-eval on {cfg.model}: {len(results)} task(s) in {seconds:.0f}s -> {summary['path']}")
    return summary


def _lm_eval(cfg: HarnessConfig):
    """lm_eval and a TaskManager that knows every asked-for task; one-line errors for a missing package
    or an unknown task, before the model is loaded."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LlmlabError("llmlab eval harness needs lm-evaluation-harness: pip install 'llmlab[eval]'") from None
    manager = TaskManager(include_path=cfg.include_path) if cfg.include_path else TaskManager()
    known = set(manager.all_tasks)
    for task in cfg.tasks:
        if task not in known:
            raise LlmlabError(f"unknown lm-eval task '{task}'{closest(task, known)}; "
                              "`lm-eval ls tasks` lists them (add your own with --include-path)")
    return lm_eval, manager


def _metrics(values: dict) -> dict[str, float]:
    """lm-eval's numeric metrics of one task, `acc,none` named `acc` (other filters keep their suffix)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in key:
            metric, _, filt = key.partition(",")
            out[metric if filt in ("", "none") else f"{metric},{filt}"] = value
    return out


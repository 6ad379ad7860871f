"""Who runs a map phase's tasks: a local process pool, datatrove's LocalPipelineExecutor, or Ray.

A task is a JSON-able dict that names one input shard, the steps and the output shard (see
pipeline.run_map_task); running it writes the shard and then its done marker, so any engine that can call
a function on each task in parallel can run the pipeline, and resume stays ours (done markers), not the engine's.

    local      a ProcessPoolExecutor(workers) over the pending tasks: no dependency, the default.
    datatrove  LocalPipelineExecutor(tasks=len(tasks), workers=N): task `rank` runs shard `rank`.
    ray        one ray.remote call per task on a local (or, with RAY_ADDRESS, an existing) Ray cluster.

Why datatrove is the tested scale-out path (`pip install 'llmlab[scale]'`): it installs three small
packages here (datatrove, loguru, humanize) where Ray pulls in a ~70 MB wheel, protobuf and a cluster runtime;
its executors are the same rank-over-tasks model as ours, so no code changes between one machine
(LocalPipelineExecutor) and a cluster (SlurmPipelineExecutor takes the same pipeline list); and it is the
engine behind FineWeb, whose filters our steps mirror. Ray is kept as an option for users who already run a
Ray cluster; it is not installed here and its path is untested.
"""

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from llmlab.errors import LlmlabError


def execute(fn: Callable[[dict], dict], tasks: list[dict], executor: str, workers: int,
            folder: Path) -> Iterator[dict]:
    """Run fn(task) for every task, yielding each task's result (its done marker) as it finishes."""
    workers = min(workers, len(tasks))
    if not tasks:
        return
    if executor == "local" and workers == 1:
        yield from map(fn, tasks)
    elif executor == "local":
        # not multiprocessing.Pool: its terminate() on an error can deadlock; this waits for running tasks
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context()) as pool:
            futures = [pool.submit(fn, task) for task in tasks]
            try:
                for future in as_completed(futures):
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()
    elif executor == "datatrove":
        _require("datatrove")
        from datatrove.executor import LocalPipelineExecutor

        LocalPipelineExecutor([partial(_datatrove_task, fn, tasks)], tasks=len(tasks), workers=workers,
                              logging_dir=str(folder / "datatrove"), skip_completed=False).run()
        for task in tasks:  # results come back through the markers the tasks wrote
            yield {"out": task["out"], **json.loads(Path(task["out"]).with_suffix(".json").read_text("utf-8"))}
    else:
        _require("ray")
        import ray

        if os.environ.get("RAY_ADDRESS"):  # join the user's cluster, which has its own CPU count
            ray.init(ignore_reinit_error=True)
        else:
            ray.init(num_cpus=workers, ignore_reinit_error=True, include_dashboard=False)
        remote = ray.remote(fn)
        refs = [remote.remote(task) for task in tasks]
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            yield ray.get(ready[0])


def _datatrove_task(fn, tasks: list[dict], data, rank: int, world_size: int):
    """A datatrove pipeline step has the signature (data, rank, world_size); task `rank` is our task `rank`."""
    fn(tasks[rank])


def _require(module: str):
    try:
        __import__(module)
    except ImportError:
        raise LlmlabError(f"executor {module} needs the {module} package: pip install 'llmlab[scale]'") from None

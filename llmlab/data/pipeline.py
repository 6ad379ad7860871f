"""The data pipeline: readers → steps → writers, with a record of what each step removed.

A pipeline is a YAML file (`llmlab data run pipeline.yaml`, or `run_pipeline(cfg)`); documents are plain
dicts `{"id": str, "text": str, ...metadata}`. Each step is a `Step` subclass registered under its YAML name.

Two kinds of phase. The steps are cut into phases: a run of consecutive per-document steps is one *map*
phase, and each global step (`global_ = True`: de-duplication, decontamination) is a phase of its own.
    map:     every shard of the phase's input is read, streamed through the steps and written as one
             JSONL shard, in a pool of `workers` processes (or datatrove/Ray tasks, `executor`);
    global:  the main process streams the concatenation of all shards, in shard order, through the step
             and writes the result re-cut into shards of `output.shard_docs` documents.
Phase 0 reads the input files; phase k reads phase k-1's shards. Shard order is fixed, so the output is
the same for any number of workers.

Resume. Everything lives in the run folder; `work/phase-<k>-<hash>/` holds a phase's shards, and each
shard's `.json` log (its counts, drops and samples), written after the shard itself, is its done marker.
The hash covers the input files (sizes, times) and the steps up to that phase, so a re-run with the same
config skips finished shards and phases, and changing a late step keeps the earlier phases. All writes
are atomic (llmlab.atomic); the output folder `data/` and `dropped/` appear only when the run finishes.

Token shards. With `output.tokenizer` set, the kept documents are also tokenized and packed into
`tokens/` (llmlab.data.shards: uint16/uint32 memory maps, EOS between documents, a manifest), which
`llmlab finetune --data <run>/tokens` and `TokenShards` read.
"""

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Literal

from llmlab import methods
from llmlab.atomic import atomic_dir, atomic_write_json, atomic_write_jsonl
from llmlab.config import build, field
from llmlab.data import readers
from llmlab.data.executors import execute
from llmlab.data.readers import InputConfig
from llmlab.data.shards import load_tokenizer, pack_texts
from llmlab.data.steps.base import SAMPLES_PER_REASON, Step, StepLog
from llmlab.errors import LlmlabError, closest
from llmlab.runs import RunOptions, format_table, start_run

log = logging.getLogger("llmlab")



def make_step(name: str, options: dict | None = None, where: str = "steps") -> Step:
    """The step called `name` in llmlab.methods, configured from a YAML mapping; unknown names suggest the closest."""
    steps = methods.names("data")
    if name not in steps:
        raise LlmlabError(f"unknown step '{name}' in {where}{closest(name, steps)}; "
                          f"known steps: {', '.join(sorted(steps))}")
    _, cls, _ = methods.load("data", name)
    return cls(build(cls.Config, options or {}, f"{where}.{name}"))


# ---- the pipeline config ----


@dataclasses.dataclass
class OutputConfig:
    path: str = field("", help="the run folder (output in <path>/data); default --out or runs/data-run-<time>")
    format: Literal["jsonl", "parquet"] = field("jsonl", help="format of the output shards")
    shard_docs: int = field(10000, help="documents per output shard")
    tokenizer: str = field("", help="also pack the kept documents into token shards (<out>/tokens) with this "
                                    "tokenizer: a folder, a model name or a hub id")
    shard_tokens: int = field(1 << 24, help="tokens per token shard")

    def __post_init__(self):
        if self.shard_docs < 1:
            raise LlmlabError(f"output.shard_docs must be at least 1, got {self.shard_docs}")
        if self.shard_tokens < 2:
            raise LlmlabError(f"output.shard_tokens must be at least 2, got {self.shard_tokens}")


@dataclasses.dataclass
class PipelineConfig:
    input: InputConfig = field(default_factory=InputConfig, help="what to read")
    output: OutputConfig = field(default_factory=OutputConfig, help="where to write")
    steps: list[Any] = field([], help="steps in order, each a name or {name: {options}}")
    workers: int = field(1, help="processes for the per-document phases")
    executor: Literal["local", "datatrove", "ray"] = field(
        "local", help="who runs the per-document tasks: a local process pool, datatrove or Ray (llmlab[scale])")
    resume: bool = field(True, help="skip shards and phases a killed run with the same config finished")
    keep_dropped: int = field(SAMPLES_PER_REASON, help="dropped documents kept per step and reason")
    keep_work: bool = field(False, help="keep the intermediate shards in <out>/work after a finished run")
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self):
        if not self.input.path:
            raise LlmlabError("input.path is required: the files to read, e.g. input: {path: raw/*.jsonl}")
        if self.workers < 1:
            raise LlmlabError(f"workers must be at least 1, got {self.workers}")
        if self.keep_dropped < 0:
            raise LlmlabError(f"keep_dropped must be 0 or more, got {self.keep_dropped}")
        for i, (name, options) in enumerate(parse_steps(self.steps)):
            make_step(name, options, f"steps[{i}]")  # fail on a bad name or option before reading any data

    @staticmethod
    def more_help() -> str:
        steps = {name: methods.entry("data", name).help for name in methods.names("data")}
        width = max(map(len, steps), default=0) + 2
        rows = [f"  {n:<{width}}{help_}" for n, help_ in sorted(steps.items())]
        return "\n\nsteps:\n" + "\n".join(rows)


def parse_steps(steps: list) -> list[tuple[str, dict]]:
    """YAML step entries (`name` or `{name: {options}}`) as (name, options) pairs."""
    out = []
    for i, entry in enumerate(steps):
        if isinstance(entry, str):
            out.append((entry, {}))
        elif isinstance(entry, dict) and len(entry) == 1 and isinstance(next(iter(entry.values())) or {}, dict):
            name, options = next(iter(entry.items()))
            out.append((str(name), options or {}))
        else:
            raise LlmlabError(f"steps[{i}] must be a step name or {{name: {{options}}}}, got {entry!r}")
    return out


# ---- running one chain of steps ----

class _Meter:
    """Counts the documents and bytes flowing past one point of a step chain, and the CPU time spent making
    them (CPU, not wall-clock, time: per-step figures stay meaningful on a machine shared with other jobs)."""

    def __init__(self, docs: Iterator[dict]):
        self.docs, self.n, self.bytes, self.seconds = docs, 0, 0, 0.0

    def __iter__(self):
        it = iter(self.docs)
        while True:
            start = time.process_time()
            try:
                doc = next(it)
            except StopIteration:
                self.seconds += time.process_time() - start
                return
            self.seconds += time.process_time() - start
            self.n += 1
            self.bytes += len(doc["text"].encode("utf-8"))
            yield doc


class Chain:
    """Documents streamed through a list of steps, with docs/bytes/seconds metered between every two steps."""

    def __init__(self, docs: Iterator[dict], steps: list[tuple[str, dict]], keep: int):
        self.meters, self.logs = [_Meter(docs)], []
        for name, options in steps:
            self.logs.append(StepLog(name, keep))
            self.meters.append(_Meter(make_step(name, options).process(iter(self.meters[-1]), self.logs[-1])))

    def __iter__(self):
        return iter(self.meters[-1])

    def stats(self) -> list[dict]:
        """One dict per step; a step's time is what pulling from it cost minus what its input cost."""
        m = self.meters
        return [{**log.to_dict(), "docs_in": m[i].n, "docs_out": m[i + 1].n, "bytes_in": m[i].bytes,
                 "bytes_out": m[i + 1].bytes, "seconds": m[i + 1].seconds - m[i].seconds}
                for i, log in enumerate(self.logs)]


def run_map_task(task: dict) -> dict:
    """One shard of a map phase: read it, run the steps, write the shard, then its log (the done marker)."""
    reads = Counter()
    if task["source"]["kind"] == "work":
        docs = readers.iter_jsonl(task["source"]["path"])
    else:
        docs = readers.read_shard(task["source"], InputConfig(**task["input"]), reads)
    chain = Chain(docs, task["steps"], task["keep"])
    out = Path(task["out"])
    atomic_write_jsonl(out, list(chain))
    marker = {"read": {**reads, "docs": chain.meters[0].n, "bytes": chain.meters[0].bytes}, "steps": chain.stats()}
    atomic_write_json(out.with_suffix(".json"), marker)
    return {"out": str(out), **marker}


# ---- phases and resume ----

def plan_phases(steps: list[tuple[str, dict]]) -> list[dict]:
    """Consecutive per-document steps form one map phase; each global step is a phase of its own.
    Phase 0 is always a map phase (possibly with no steps), so input is read in parallel."""
    phases: list[dict] = []
    for name, options in steps:
        if methods.load("data", name)[1].global_:
            phases.append({"global": True, "steps": [(name, options)]})
        elif phases and not phases[-1]["global"]:
            phases[-1]["steps"].append((name, options))
        else:
            phases.append({"global": False, "steps": [(name, options)]})
    if not phases or phases[0]["global"]:
        phases.insert(0, {"global": False, "steps": []})
    return phases


def _fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _run_map(phase: dict, folder: Path, sources: list[dict], cfg: PipelineConfig, desc: str) -> list[dict]:
    """Run a map phase over `sources`, skipping shards whose done marker exists; markers in shard order."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [{"out": str(folder / f"shard-{i:05d}.jsonl"), "source": source, "steps": phase["steps"],
              "input": dataclasses.asdict(cfg.input), "keep": cfg.keep_dropped} for i, source in enumerate(sources)]
    done = {}
    for task in tasks:
        marker = Path(task["out"]).with_suffix(".json")
        if marker.is_file():
            done[task["out"]] = {"out": task["out"], **json.loads(marker.read_text(encoding="utf-8"))}
    pending = [t for t in tasks if t["out"] not in done]
    if done:
        log.info("%s: %d of %d shards already done, skipping them", desc, len(done), len(tasks))
    with _bar(cfg, len(tasks), desc, "shard", initial=len(done)) as bar:
        for marker in execute(run_map_task, pending, cfg.executor, cfg.workers, folder):
            done[marker["out"]] = marker
            bar.update()
    return [done[t["out"]] for t in tasks]


def _run_global(phase: dict, folder: Path, sources: list[str], cfg: PipelineConfig, total: int, desc: str) -> dict:
    """Stream every shard, in order, through one global step; write the result in shards of output.shard_docs."""
    marker_path = folder / "phase.json"
    if marker_path.is_file():
        log.info("%s: already done, skipping it", desc)
        return json.loads(marker_path.read_text(encoding="utf-8"))
    shutil.rmtree(folder, ignore_errors=True)  # a half-finished earlier attempt
    folder.mkdir(parents=True)
    docs = (doc for path in sources for doc in readers.iter_jsonl(path))
    with _bar(cfg, total, desc, "doc") as bar:
        chain = Chain(_counted(docs, bar), phase["steps"], cfg.keep_dropped)
        shards = 0
        for batch in _batched(chain, cfg.output.shard_docs):
            atomic_write_jsonl(folder / f"shard-{shards:05d}.jsonl", batch)
            shards += 1
    marker = {"shards": shards, "steps": chain.stats()}
    atomic_write_json(marker_path, marker)
    return marker


def _counted(docs: Iterator[dict], bar) -> Iterator[dict]:
    for doc in docs:
        bar.update()
        yield doc


def _batched(docs, n: int) -> Iterator[list[dict]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _bar(cfg: PipelineConfig, total: int, desc: str, unit: str, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not cfg.progress, leave=False)


# ---- the run ----

def run_pipeline(cfg: PipelineConfig, opts=None) -> dict:
    """Run the pipeline into a run folder (opts.out, else output.path, else runs/data-run-<time>):
    data/ (output shards), dropped/<step>/<reason>.jsonl, summary.json, config.yaml, log.txt."""
    opts = dataclasses.replace(opts or RunOptions(), out=(opts and opts.out) or cfg.output.path or None)
    started = time.perf_counter()
    tokenizer = _output_tokenizer(cfg)  # a bad tokenizer fails now, not after the whole pipeline
    with start_run("data run", cfg, opts) as run:
        work = run.path / "work"
        if not cfg.resume:
            shutil.rmtree(work, ignore_errors=True)
        phases = plan_phases(parse_steps(cfg.steps))
        key = [readers.input_fingerprint(cfg.input), dataclasses.asdict(cfg.input)]
        folders = []
        for k, phase in enumerate(phases):
            key.append(phase)
            folders.append(work / f"phase-{k}-{_fingerprint(key)}")
        for stale in (work.iterdir() if work.is_dir() else []):  # phases of an older config
            if stale not in folders:
                shutil.rmtree(stale)
        sources, results = readers.plan_shards(cfg.input), []
        for k, (phase, folder) in enumerate(zip(phases, folders)):
            desc = f"phase {k + 1}/{len(phases)} ({', '.join(n for n, _ in phase['steps']) or 'read'})"
            if phase["global"]:
                total = results[-1]["steps"][-1]["docs_out"] if results[-1]["steps"] else results[-1]["read"]["docs"]
                marker = _run_global(phase, folder, [s["path"] for s in sources], cfg, total, desc)
                results.append(marker)
                sources = [{"kind": "work", "path": str(folder / f"shard-{i:05d}.jsonl")} for i in range(marker["shards"])]
            else:
                markers = _run_map(phase, folder, sources, cfg, desc)
                results.append(_merge_markers(markers))
                sources = [{"kind": "work", "path": m["out"]} for m in markers]
            if k == 0 and results[0]["read"]["docs"] == 0:
                raise LlmlabError(f"input.path {cfg.input.path}: no documents to read "
                                  f"({results[0]['read'].get('invalid_utf8', 0)} rows skipped as invalid UTF-8)")
        summary = _write_outputs(run.path, [s["path"] for s in sources], results, cfg)
        if tokenizer is not None:
            summary["tokens"] = _write_tokens(run.path, [s["path"] for s in sources], tokenizer, cfg)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        summary["mb_per_s"] = round(summary["bytes_read"] / 2**20 / max(summary["seconds"], 1e-9), 3)
        print(summary_table(summary))
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        return run.finish(summary)


def _output_tokenizer(cfg: PipelineConfig):
    if not cfg.output.tokenizer:
        return None

    return load_tokenizer(cfg.output.tokenizer)


def _write_tokens(folder: Path, shards: list[str], tokenizer, cfg: PipelineConfig) -> dict:
    """The kept documents as token shards in <folder>/tokens, which the training loaders read."""
    texts = (doc["text"] for path in shards for doc in readers.iter_jsonl(path))
    manifest = pack_texts(texts, tokenizer, folder / "tokens", cfg.output.shard_tokens, name=cfg.output.tokenizer)
    return {key: manifest[key] for key in ("total_tokens", "documents", "dtype")} | {"shards": len(manifest["shards"])}


def _merge_markers(markers: list[dict]) -> dict:
    """Add up the per-shard counts of a map phase; samples are merged in shard order, so they are deterministic."""
    read = Counter()
    for m in markers:
        read.update(m["read"])
    steps = [_merge_step_stats([m["steps"][i] for m in markers]) for i in range(len(markers[0]["steps"]))] \
        if markers else []
    return {"read": dict(read), "steps": steps}


def _merge_step_stats(parts: list[dict]) -> dict:
    merged = StepLog.from_dict(parts[0])
    for part in parts[1:]:
        merged.merge(StepLog.from_dict(part))
    numbers = {k: sum(p[k] for p in parts) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "seconds")}
    return {**merged.to_dict(), **numbers}


def _write_outputs(folder: Path, shards: list[str], results: list[dict], cfg: PipelineConfig) -> dict:
    """The output shards (data/), the dropped samples (dropped/), and the summary numbers."""
    files, docs_out, bytes_out = [], 0, 0
    ext = "jsonl" if cfg.output.format == "jsonl" else "parquet"
    with atomic_dir(folder / "data") as tmp:
        stream = (doc for path in shards for doc in readers.iter_jsonl(path))
        for i, batch in enumerate(_batched(stream, cfg.output.shard_docs)):
            readers.write_docs(tmp / f"part-{i:05d}.{ext}", batch, cfg.output.format)
            files.append(f"data/part-{i:05d}.{ext}")
            docs_out += len(batch)
            bytes_out += sum(len(d["text"].encode("utf-8")) for d in batch)
    steps = [s for r in results for s in r["steps"]]
    names = Counter(s["step"] for s in steps)
    seen = Counter()
    with atomic_dir(folder / "dropped") as tmp:
        for s in steps:
            seen[s["step"]] += 1
            s["label"] = s["step"] if names[s["step"]] == 1 else f"{s['step']}-{seen[s['step']]}"
            for reason, docs in s.pop("samples").items():
                atomic_write_jsonl(tmp / s["label"] / f"{reason}.jsonl", docs)
    read = results[0]["read"]
    return {"docs_read": read["docs"], "bytes_read": read["bytes"], "invalid_utf8": read.get("invalid_utf8", 0),
            "docs_out": docs_out, "bytes_out": bytes_out, "files": files, "steps": steps}


def summary_table(summary: dict) -> str:
    """Per step: documents and MB in and out, time, and what was dropped or changed and why."""
    rows = [["read", "", summary["docs_read"], "", f"{summary['bytes_read'] / 2**20:.2f}", "", "",
             f"invalid_utf8={summary['invalid_utf8']}" if summary["invalid_utf8"] else ""]]
    for s in summary["steps"]:
        what = {**s["drops"], **{f"{k} (changed)": v for k, v in s["changes"].items()}}
        rows.append([s["label"], s["docs_in"], s["docs_out"], f"{s['bytes_in'] / 2**20:.2f}",
                     f"{s['bytes_out'] / 2**20:.2f}", f"{100 * s['docs_out'] / max(s['docs_in'], 1):.1f}",
                     f"{s['seconds']:.2f}", ", ".join(f"{k}={v}" for k, v in sorted(what.items(), key=lambda x: -x[1]))])
    table = format_table(["step", "docs in", "docs out", "MB in", "MB out", "kept %", "cpu s", "dropped / changed"], rows)
    return (f"{table}\n\n{summary['docs_out']} of {summary['docs_read']} documents kept "
            f"({summary['bytes_out'] / 2**20:.2f} of {summary['bytes_read'] / 2**20:.2f} MB) "
            f"in {len(summary['files'])} file(s), {summary['seconds']:.1f} s, {summary['mb_per_s']:.2f} MB/s")

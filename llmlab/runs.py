"""Run folders and the SQLite run registry.

Every verb that produces results writes `runs/<name>/`:
    config.yaml      the resolved config
    metrics.jsonl    one JSON object per logged step
    summary.json     the final metrics
    log.txt          what the run logged
    ...              artifacts (models, generations, …)
and records a row in `runs/registry.sqlite` so that runs can be listed and compared.
Files are written to a temporary name and renamed, so a killed run never leaves half a file.
"""

import dataclasses
import json
import logging
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import yaml

from llmlab.atomic import atomic_write, atomic_write_json
from llmlab.errors import LlmlabError, closest

log = logging.getLogger("llmlab")

DEFAULT_REGISTRY = "runs/registry.sqlite"


def registry_path(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("LLMLAB_REGISTRY") or DEFAULT_REGISTRY)


class Registry:
    """One row per run: name, verb, model, status, times, folder, summary."""

    def __init__(self, path: str | Path | None = None):
        self.path = registry_path(path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("""CREATE TABLE IF NOT EXISTS runs (
            name TEXT PRIMARY KEY, verb TEXT, model TEXT, status TEXT,
            created REAL, finished REAL, path TEXT, summary TEXT, config TEXT)""")
        return db

    def record(self, run: "Run", status: str, summary: dict | None = None):
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.name, run.verb, run.model, status, run.created,
                 time.time() if status != "running" else None, str(run.path.resolve()),
                 json.dumps(summary or {}, default=str), json.dumps(run.config, default=str)))

    def rows(self, verb: str | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        query = "SELECT * FROM runs" + (" WHERE verb = ?" if verb else "") + " ORDER BY created"
        with closing(self._connect()) as db:
            return [_decode(r) for r in db.execute(query, (verb,) if verb else ())]

    def get(self, name: str) -> dict:
        rows = {r["name"]: r for r in self.rows()}
        if name not in rows:
            raise LlmlabError(f"no run named '{name}' in {self.path}{closest(name, rows)}; "
                              "see `llmlab runs list`")
        return rows[name]


def _decode(row: sqlite3.Row) -> dict:
    out = dict(row)
    out["summary"] = json.loads(out["summary"] or "{}")
    out["config"] = json.loads(out["config"] or "{}")
    return out


class Run:
    """A run folder being written. Use as a context manager: an exception marks it failed."""

    def __init__(self, verb: str, config: dict, out: str | Path | None = None,
                 name: str | None = None, registry: str | Path | None = None, model: str = ""):
        self.verb, self.config, self.model = verb, config, model
        self.created = time.time()
        self.path = Path(out) if out else _fresh_folder(Path("runs"), name or _default_name(verb))
        self.name = name or self.path.name
        self.path.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(registry)
        self._handler = None

    def __enter__(self):
        atomic_write(self.path / "config.yaml", yaml.safe_dump(
            {"verb": self.verb, **self.config}, sort_keys=False, allow_unicode=True))
        self._handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._handler)
        self.registry.record(self, "running")
        return self

    def __exit__(self, exc_type, exc, tb):
        log.removeHandler(self._handler)
        self._handler.close()
        if exc_type is not None:
            status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            self.registry.record(self, status, {"error": f"{exc_type.__name__}: {exc}"})
        return False

    def artifact(self, name: str) -> Path:
        return self.path / name

    def log_metrics(self, **metrics):
        """Append one JSON line; lines are flushed one by one so a killed run keeps what it logged."""
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **metrics}, default=str) + "\n")

    def finish(self, summary: dict) -> dict:
        summary = {"run": self.name, "path": str(self.path), **summary}
        atomic_write_json(self.path / "summary.json", summary)
        self.registry.record(self, "finished", summary)
        log.info("run %s finished: %s", self.name, self.path)
        return summary


def _default_name(verb: str) -> str:
    return f"{verb.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def _fresh_folder(root: Path, name: str) -> Path:
    """`root/name`, or `root/name-2`, `-3`, … so that no earlier run is overwritten."""
    path, n = root / name, 1
    while path.exists():
        n += 1
        path = root / f"{name}-{n}"
    return path


def load_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise LlmlabError(f"{run_dir} is not a finished run folder (no summary.json)")
    return json.loads(path.read_text(encoding="utf-8"))


@dataclasses.dataclass
class RunOptions:
    """Where and how a verb writes its run: common to every verb, not part of any verb's config."""
    out: str | None = None
    name: str | None = None
    registry: str | None = None
    json: bool = False
    debug: bool = False


def start_run(verb: str, cfg, opts: RunOptions | None = None, model: str = "") -> Run:
    opts = opts or RunOptions()
    return Run(verb, dataclasses.asdict(cfg), out=opts.out, name=opts.name, registry=opts.registry,
               model=model or getattr(cfg, "model", ""))


# ---- the `llmlab runs …` verbs ----


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def fmt_cell(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"
    return "-" if x is None else str(x)


def format_table(header: list[str], rows: list[list]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])

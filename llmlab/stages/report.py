"""`llmlab report RUN…`: compare runs in a table, plots, Markdown and a self-contained HTML page."""

from dataclasses import dataclass

from llmlab.config import field
from llmlab.evaluate.report import build_report, gather
from llmlab.runs import Registry, RunOptions, start_run


@dataclass
class ReportConfig:
    runs: list[str] = field([], help="run names to compare (default: every finished run in the registry)")
    verb: str | None = field(None, help="only runs of this verb, e.g. 'eval ppl'")
    title: str = field("llmlab report", help="title of the report")


def report_verb(cfg: ReportConfig, opts: RunOptions) -> dict:
    rows = gather(Registry(opts.registry), cfg.runs, cfg.verb)
    with start_run("report", cfg, opts, model="") as run:
        written = build_report(rows, run.path, cfg.title)
        print(f"report of {len(rows)} runs -> {written['html']}")
        return run.finish(written)

"""`llmlab runs list|show|compare`: the run registry from the command line."""

import dataclasses
import time

import yaml

from llmlab.config import field
from llmlab.runs import Registry, RunOptions, fmt_cell, format_table, is_number


@dataclasses.dataclass
class RunsListConfig:
    verb: str | None = field(None, help="only runs of this verb, e.g. 'eval ppl'")


@dataclasses.dataclass
class RunsShowConfig:
    name: str = field("", help="run name")


@dataclasses.dataclass
class RunsCompareConfig:
    names: list[str] = field([], help="run names")


def runs_list(cfg: RunsListConfig, opts: RunOptions) -> dict:
    rows = Registry(opts.registry).rows(cfg.verb)
    table = [[r["name"], r["verb"], r["model"], r["status"],
              time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])), _headline(r["summary"])]
             for r in rows]
    print(format_table(["name", "verb", "model", "status", "created", "result"], table)
          if rows else f"no runs in {Registry(opts.registry).path}")
    return {"runs": [r["name"] for r in rows]}


def runs_show(cfg: RunsShowConfig, opts: RunOptions) -> dict:
    row = Registry(opts.registry).get(cfg.name)
    print(f"{row['name']}  ({row['verb']}, {row['status']})\nfolder: {row['path']}\n\nconfig:")
    print(yaml.safe_dump(row["config"], sort_keys=False, allow_unicode=True).rstrip())
    print("\nsummary:")
    print(yaml.safe_dump(row["summary"], sort_keys=False, allow_unicode=True).rstrip())
    return row


def runs_compare(cfg: RunsCompareConfig, opts: RunOptions) -> dict:
    registry = Registry(opts.registry)
    rows = [registry.get(name) for name in cfg.names]
    metrics = [k for k in dict.fromkeys(k for r in rows for k in r["summary"])
               if any(is_number(r["summary"].get(k)) for r in rows)]
    table = [[m] + [fmt_cell(r["summary"].get(m)) for r in rows] for m in metrics]
    print(format_table(["metric"] + [r["name"] for r in rows], table))
    return {r["name"]: {m: r["summary"].get(m) for m in metrics} for r in rows}


def _headline(summary: dict) -> str:
    """The one or two numbers that say what a run found."""
    keys = [k for k in ("ppl", "accuracy", "loss", "tokens_per_s") if is_number(summary.get(k))]
    return "  ".join(f"{k}={fmt_cell(summary[k])}" for k in keys[:2])

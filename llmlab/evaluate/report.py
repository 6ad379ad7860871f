"""Comparison reports: many runs side by side, as a table, plots and one self-contained page.

`llmlab report [RUN …] [--verb V]` gathers runs from the registry (all finished runs if none are
named). Every run becomes one row of the table: quality (perplexity, accuracies), size on disk,
parameters, tokens/s and peak memory, whichever of these its summary holds. An evaluation run
is linked to the run that made its model (a `quantize`, `prune` or `finetune` run whose output
folder is the evaluated model), so a perplexity can be plotted against the producer's bits or
sparsity. Plots, each only when there is something to draw:

    ppl_vs_bits.png        perplexity against weight bits, one line per method, fp as a dashed line
    quality_vs_sparsity.png perplexity/accuracy against sparsity
    loss_curves.png        training loss (and eval loss) against step, one line per training run
    subjects.png           per-subject accuracy bars of multiple-choice evaluations

The report is written as report.md (table + PNGs beside it) and report.html, which inlines the
PNGs so that the one file can be mailed or opened anywhere.
"""

import base64
import html
import json
from pathlib import Path

from llmlab.atomic import atomic_write, atomic_write_json
from llmlab.data.text import lines
from llmlab.errors import LlmlabError
from llmlab.runs import Registry, format_table

# column -> the summary keys that verbs use for it, first found wins
COLUMNS = {
    "ppl": ("ppl", "perplexity"),
    "accuracy": ("accuracy", "acc"),
    "acc_norm": ("acc_norm",),
    "size MB": ("size_mb",),
    "params": ("params", "parameters", "total_params"),
    "tokens/s": ("tokens_per_s", "generation_tokens_per_s"),
    "peak MB": ("peak_rss_mb", "peak_memory_mb", "peak_mb"),
}
PRODUCER_KNOBS = ("method", "bits", "group_size", "sparsity", "pattern")
SKIP_VERBS = {"report", "arena"}


# ---- gathering ----

def gather(registry: Registry, names: list[str], verb: str | None = None) -> list[dict]:
    """Registry rows to report, each with `producer` (the row that made its model, or None)."""
    every = registry.rows()
    rows = [registry.get(n) for n in names] if names else [
        r for r in every if r["status"] == "finished" and r["verb"] not in SKIP_VERBS]
    if verb:
        rows = [r for r in rows if r["verb"] == verb]
    if not rows:
        raise LlmlabError(f"no runs to report in {registry.path}" + (f" with verb '{verb}'" if verb else "")
                          + "; run some stages first or name runs (see `llmlab runs list`)")
    outputs = _outputs(every)
    for r in rows:
        r["producer"] = outputs.get(_resolve(r["config"].get("model")))
    return rows


def _outputs(rows: list[dict]) -> dict[str, dict]:
    """Where each run left a model: its folder, its model/ sub-folder, or the path its summary names."""
    out = {}
    for r in rows:
        places = [r["path"], Path(r["path"]) / "model", r["summary"].get("saved"), r["summary"].get("out"),
                  r["config"].get("out")]
        for place in places:
            if place:
                out[_resolve(place)] = r
    return out


def _resolve(path) -> str | None:
    return str(Path(path).expanduser().resolve()) if isinstance(path, str) and path else None


def row_values(run: dict) -> dict:
    """The table's columns for one run; size on disk measured when the summary does not say."""
    summary, values = run["summary"], {}
    for column, keys in COLUMNS.items():
        values[column] = next((summary[k] for k in keys if _number(summary.get(k))), None)
    if values["size MB"] is None and _number(summary.get("size_bytes")):
        values["size MB"] = summary["size_bytes"] / 2**20
    if values["size MB"] is None:
        values["size MB"] = _size_mb(run["config"].get("model"))
    producer = run.get("producer") or {}
    knobs = {**producer.get("config", {}), **run["config"]}
    values.update({k: knobs.get(k) for k in PRODUCER_KNOBS})
    if producer:
        values["method"] = producer["config"].get("method", producer["verb"])
    return values


def _size_mb(model) -> float | None:
    path = Path(model) if isinstance(model, str) else None
    if path is None or not path.exists():
        return None
    files = [path] if path.is_file() else [*path.glob("*.safetensors"), *path.glob("model/*.safetensors"),
                                           *path.glob("*.gguf")]
    return sum(f.stat().st_size for f in files) / 2**20 if files else None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---- plots ----

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_bits(rows: list[tuple[dict, dict]], path: Path) -> Path | None:
    """Perplexity of quantized models against their bits; unquantized models as dashed lines."""
    points = [(v["bits"], v["ppl"], str(v["method"])) for _, v in rows if _number(v["bits"]) and _number(v["ppl"])]
    floats = [(r["name"], v["ppl"]) for r, v in rows if v["bits"] is None and _number(v["ppl"])]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in sorted({m for _, _, m in points}):
        xs, ys = zip(*sorted((b, p) for b, p, m in points if m == method))
        ax.plot(xs, ys, marker="o", label=method)
    for name, ppl in floats:
        ax.axhline(ppl, linestyle="--", color="grey", linewidth=1)
        ax.annotate(f"{name} (float)", (min(b for b, _, _ in points), ppl), fontsize=8, va="bottom")
    ax.set(xlabel="weight bits", ylabel="perplexity (lower is better)", title="Perplexity vs bits")
    ax.set_xticks(sorted({b for b, _, _ in points}))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_quality_vs_sparsity(rows: list[tuple[dict, dict]], path: Path) -> Path | None:
    points = [(v["sparsity"], v["ppl"] if _number(v["ppl"]) else v["accuracy"], str(v["method"]))
              for _, v in rows if _number(v["sparsity"]) and (_number(v["ppl"]) or _number(v["accuracy"]))]
    if not points:
        return None
    metric = "perplexity (lower is better)" if any(_number(v["ppl"]) for _, v in rows) else "accuracy"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in sorted({m for _, _, m in points}):
        xs, ys = zip(*sorted((s, q) for s, q, m in points if m == method))
        ax.plot(xs, ys, marker="o", label=method)
    ax.set(xlabel="sparsity (fraction of weights removed)", ylabel=metric, title=f"{metric.split(' ')[0]} vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_loss_curves(runs: list[dict], path: Path) -> Path | None:
    curves = {r["name"]: _metrics(r["path"]) for r in runs}
    curves = {n: m for n, m in curves.items() if any("loss" in row for row in m)}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, rows in curves.items():
        train = [(row["step"], row["loss"]) for row in rows if "loss" in row and "step" in row]
        line, = ax.plot(*zip(*train), label=f"{name} train")
        held = [(row["step"], row["eval_loss"]) for row in rows if "eval_loss" in row and "step" in row]
        if held:
            ax.plot(*zip(*held), linestyle="--", marker=".", color=line.get_color(), label=f"{name} eval")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per token)", title="Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_subjects(runs: list[dict], path: Path) -> Path | None:
    """One horizontal bar per subject (and run), accuracy in percent."""
    per_run = {r["name"]: _subject_scores(r["summary"]) for r in runs}
    per_run = {n: s for n, s in per_run.items() if s}
    if not per_run:
        return None
    subjects = sorted({s for scores in per_run.values() for s in scores})
    plt = _pyplot()
    height = max(3.0, 0.28 * len(subjects) * len(per_run) + 1.2)
    fig, ax = plt.subplots(figsize=(7.0, height), dpi=120)
    width = 0.8 / len(per_run)
    for i, (name, scores) in enumerate(per_run.items()):
        ys = [j + i * width for j in range(len(subjects))]
        ax.barh(ys, [100 * scores.get(s, 0.0) for s in subjects], height=width, label=name)
    ax.set_yticks([j + 0.4 - width / 2 for j in range(len(subjects))], subjects, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="accuracy (%)", xlim=(0, 100), title="Accuracy per subject")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _subject_scores(summary: dict) -> dict[str, float]:
    """{subject: accuracy} from a summary's per-subject section, whatever the evaluation called it."""
    for key in ("subjects", "per_subject", "by_subject", "by_kind"):
        section = summary.get(key)
        if isinstance(section, dict) and section:
            return {s: v if _number(v) else v.get("acc", v.get("accuracy")) for s, v in section.items()
                    if _number(v) or (isinstance(v, dict) and _number(v.get("acc", v.get("accuracy"))))}
    return {}


def _metrics(run_path: str) -> list[dict]:
    path = Path(run_path) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in lines(path.read_text(encoding="utf-8")):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-line leaves half a line: skip it
            continue
    return rows


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---- writing ----

def table(rows: list[tuple[dict, dict]]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "verb", "model", "method", "bits", "sparsity", *COLUMNS]
    body = [[r["name"], r["verb"], _short(r["config"].get("model", r["model"])), *(_cell(v[k]) for k in header[3:])]
            for r, v in rows]
    return header, body


def _short(model) -> str:
    text = str(model or "-")
    return text if len(text) <= 40 else "…" + text[-39:]


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.4g}" if abs(x) < 1e6 else f"{x:,.0f}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


def markdown(title: str, header: list[str], body: list[list[str]], plots: list[Path]) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    lines += [""] + [f"![{p.stem}]({p.name})\n" for p in plots]
    return "\n".join(lines) + "\n"


def html_page(title: str, header: list[str], body: list[list[str]], plots: list[Path]) -> str:
    esc = html.escape
    cells = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
    images = "".join(f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}"></figure>' for p in plots)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:nth-child(-n+4){text-align:left}"
            "th{background:#f3f3f3}img{max-width:100%}figure{margin:2em 0}</style></head><body>"
            f"<h1>{esc(title)}</h1><table><tr>{''.join(f'<th>{esc(h)}</th>' for h in header)}</tr>{cells}</table>"
            f"{images}</body></html>\n")


def build_report(rows: list[dict], folder: Path, title: str = "llmlab report") -> dict:
    """Table, plots, report.md and report.html in `folder`; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    valued = [(r, row_values(r)) for r in rows]
    plots = [p for p in (plot_ppl_vs_bits(valued, folder / "ppl_vs_bits.png"),
                         plot_quality_vs_sparsity(valued, folder / "quality_vs_sparsity.png"),
                         plot_loss_curves(rows, folder / "loss_curves.png"),
                         plot_subjects(rows, folder / "subjects.png")) if p is not None]
    header, body = table(valued)
    atomic_write(folder / "report.md", markdown(title, header, body, plots))
    atomic_write(folder / "report.html", html_page(title, header, body, plots))
    atomic_write_json(folder / "table.json", [dict(zip(header, row)) for row in body])
    print(format_table(header, body))
    return {"runs": [r["name"] for r in rows], "plots": [p.name for p in plots],
            "markdown": str(folder / "report.md"), "html": str(folder / "report.html")}

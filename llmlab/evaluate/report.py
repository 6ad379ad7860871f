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
from llmlab.models.builtin import BUILTIN_NAME, cache_dir
from llmlab.runs import Registry, format_table

# column -> the summary keys that verbs use for it, first found wins. A pruned model's parameters are
# its nonzero ones; speeds are kept apart by what was timed (scoring, training or generating).
COLUMNS = {
    "ppl": ("ppl", "perplexity"),
    "accuracy": ("accuracy", "acc"),
    "acc_norm": ("acc_norm",),
    "size MB": ("size_mb",),
    "params": ("nonzero_params", "params", "parameters", "total_params"),
    "eval tok/s": (),
    "train tok/s": (),
    "gen tok/s": ("generation_tokens_per_s",),
    "peak MB": ("peak_rss_mb", "peak_memory_mb", "peak_mb"),
}
TRAINING_VERBS = {"finetune", "distill", "qat"}
GENERATING_VERBS = {"generate", "chat"}
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
    """The table's columns for one run. An evaluation of a model another run made takes that run's
    knobs (method, bits, sparsity), size and parameter count; size is measured on disk when no
    summary says it."""
    summary, values = run["summary"], {}
    for column, keys in COLUMNS.items():
        values[column] = next((summary[k] for k in keys if _number(summary.get(k))), None)
    speed = summary.get("tokens_per_s") if _number(summary.get("tokens_per_s")) else None
    column = ("train tok/s" if run["verb"] in TRAINING_VERBS else "gen tok/s" if run["verb"] in GENERATING_VERBS
              else "eval tok/s")
    values[column] = values[column] if values[column] is not None else speed
    if values["size MB"] is None and _number(summary.get("size_bytes")):
        values["size MB"] = summary["size_bytes"] / 2**20
    if values["size MB"] is None and _number(summary.get("size_on_disk_bytes")):
        values["size MB"] = summary["size_on_disk_bytes"] / 2**20
    if values["size MB"] is None:
        values["size MB"] = _size_mb(run["config"].get("model"))
    producer = run.get("producer") or {}
    if producer:
        made = row_values({**producer, "producer": None})
        for column in ("size MB", "params"):
            values[column] = made[column] if made[column] is not None else values[column]
    knobs = {**producer.get("config", {}), **run["config"]}
    values.update({k: knobs.get(k) for k in PRODUCER_KNOBS})
    if producer:
        values["method"] = producer["config"].get("method", producer["verb"])
    return values


def _size_mb(model) -> float | None:
    if model == BUILTIN_NAME:  # the built-in model's de-quantized cache folder, if it was loaded here
        model = str(cache_dir() / BUILTIN_NAME)
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
    """Perplexity of quantized models against their bits; float models (evaluated as they are, not made by
    a pruning, low-rank or distillation run) as dashed lines. A log y axis when perplexities spread widely."""
    points = [(v["bits"], v["ppl"], str(v["method"])) for _, v in rows if _number(v["bits"]) and _number(v["ppl"])]
    floats = float_baselines(rows)
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
    every = [p for _, p, _ in points] + [p for _, p in floats]
    if max(every) > 3 * min(every):
        _log_y(ax)
    ax.set_xticks(sorted({b for b, _, _ in points}))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _log_y(ax):
    """A log y axis labelled in plain numbers (20, 50, 100), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))


def float_baselines(rows: list[tuple[dict, dict]]) -> list[tuple[str, float]]:
    """(run, ppl) of the float models among the rows: evaluated as they are, not made by another run."""
    return [(r["name"], v["ppl"]) for r, v in rows
            if v["bits"] is None and v["sparsity"] is None and _number(v["ppl"]) and not r.get("producer")]


def plot_quality_vs_sparsity(rows: list[tuple[dict, dict]], path: Path) -> Path | None:
    points = [(v["sparsity"], v["ppl"] if _number(v["ppl"]) else v["accuracy"], str(v["method"]))
              for _, v in rows if _number(v["sparsity"]) and (_number(v["ppl"]) or _number(v["accuracy"]))]
    if not points:
        return None
    metric = "perplexity (lower is better)" if any(_number(v["ppl"]) for _, v in rows) else "accuracy"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    dense = float_baselines(rows) if metric.startswith("perplexity") else []
    for method in sorted({m for _, _, m in points}):
        xs, ys = zip(*sorted((s, q) for s, q, m in points if m == method))
        ax.plot(xs, ys, marker="o", label=method)
    for name, ppl in dense:  # the dense model, at sparsity 0
        ax.axhline(ppl, linestyle="--", color="grey", linewidth=1)
        ax.annotate(f"{name} (dense)", (0.01, ppl), fontsize=8, va="bottom")
    ax.set_xlim(0, min(1.0, max(s for s, _, _ in points) + 0.1))
    every = [q for _, q, _ in points] + [p for _, p in dense]
    if metric.startswith("perplexity") and max(every) > 3 * min(every):
        _log_y(ax)
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
    """The rows as cells; a column no run has a value for is left out."""
    header = ["run", "verb", "model", "method", "bits", "sparsity", *COLUMNS]
    body = [[r["name"], r["verb"], _short(r["config"].get("model", r["model"])), *(_cell(v[k]) for k in header[3:])]
            for r, v in rows]
    keep = [i for i, name in enumerate(header) if i < 3 or any(row[i] != "-" for row in body)]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in body]


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
    """Table, plots, report.md and report.html in `folder`; returns what was written. A run that made a
    model which another reported run evaluated is folded into that run's row."""
    folder.mkdir(parents=True, exist_ok=True)
    producers = {r["producer"]["name"] for r in rows if r.get("producer")}
    valued = [(r, row_values(r)) for r in rows if r["name"] not in producers]
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

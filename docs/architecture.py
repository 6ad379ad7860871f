"""Draw llmlab's folders in their three layers, with the imports between them, from the code itself.

    python docs/architecture.py            # writes docs/architecture.png

Each box is a folder (or a top-level module) of llmlab/; an arrow A → B says that modules in A import
modules in B, labelled with how many module pairs do. The layers are the ones tests/test_layers.py
enforces, so every arrow points down or stays inside a layer.
"""

import collections
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_layers import ROOT, imports, layer  # noqa: E402

ROWS = ["stages", "methods", "core"]
UTILITIES = {"errors", "atomic", "config", "runs"}  # imported from everywhere: drawn as a strip, not as arrows
ORDER = ["stages", "pretrain", "peft", "distill", "compress", "align", "evaluate", "methods", "data/steps",
         "data (pipeline, tasks)", "train", "data", "generation", "models", "models/lab", "models/packed"]
COLOURS = {"stages": "#fde2c4", "methods": "#d7e8fb", "core": "#dff2d8"}


def group(module: str) -> str:
    """The box a module belongs to: llmlab.compress.gptq -> compress; llmlab.data.steps.x -> data/steps."""
    parts = module.split(".")[1:]
    if parts[:2] in (["data", "steps"], ["models", "packed"], ["models", "lab"]):
        return "/".join(parts[:2])
    if module in ("llmlab.data.pipeline", "llmlab.data.executors", "llmlab.data.tasks", "llmlab.data.tokenizer_train"):
        return "data (pipeline, tasks)"
    return parts[0] if parts else "llmlab"


def edges() -> tuple[dict, dict]:
    graph, boxes, counts = imports(ROOT), collections.defaultdict(set), collections.Counter()
    for module, targets in graph.items():
        if layer(module) == "top":
            continue
        if group(module) not in UTILITIES:
            boxes[layer(module)].add(group(module))
        for target in targets:
            a, b = group(module), group(target)
            if a != b and layer(target) != "top" and b not in UTILITIES:
                counts[a, b] += 1
    return boxes, counts


def _verbs() -> str:
    names = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")
    return " · ".join(names[:8]) + "\n" + " · ".join(names[8:])


def draw(path: Path) -> Path:
    boxes, counts = edges()
    where, fig = {}, plt.figure(figsize=(15, 7.5))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    for row, name in enumerate(ROWS):
        y = 0.84 - row * 0.32
        ax.add_patch(plt.Rectangle((0.01, y - 0.13), 0.98, 0.26, color=COLOURS[name], alpha=0.5, lw=0))
        ax.text(0.015, y + 0.11, name.upper(), fontsize=11, weight="bold", va="top")
        names = sorted(boxes[name], key=ORDER.index)
        for i, box in enumerate(names):
            x = 0.08 + (i + 0.5) * 0.9 / len(names)
            where[box] = (x, y)
            label = box if box != "stages" else "stages/\n" + _verbs()
            ax.text(x, y, label, ha="center", va="center", fontsize=10,
                    bbox=dict(boxstyle="round,pad=0.4", fc="white", ec="#555555"))
    for (a, b), n in counts.items():
        (x0, y0), (x1, y1) = where[a], where[b]
        same_row = abs(y0 - y1) < 1e-6
        ax.annotate("", xy=(x1, y1 + (0 if same_row else 0.035)), xytext=(x0, y0 - (0 if same_row else 0.035)),
                    arrowprops=dict(arrowstyle="->", color="#888888", lw=0.4 + 0.15 * min(n, 10),
                                    connectionstyle="arc3,rad=0.25" if same_row else "arc3,rad=0.05"))
    ax.text(0.5, 0.035, "used by every layer: config.py · runs.py · atomic.py · errors.py", ha="center", fontsize=10)
    ax.text(0.99, 0.005, "arrows: imports between folders (thicker: more module pairs); llmlab/cli.py sits on top",
            ha="right", fontsize=8, color="#555555")
    fig.savefig(path, dpi=80)
    return path


if __name__ == "__main__":
    print(draw(Path(__file__).with_name("architecture.png")))

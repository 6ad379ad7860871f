"""The three layers hold: core imports nothing above it, methods import the core only, stages are imported
by nothing but cli.py, and no module imports its way round in a circle.

Imports are read from the source (module-level and function-local alike: a local import that dodges
a cycle is still a cycle). Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` too, so it
counts as an import of those packages as well, except the importer's own.
"""

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "llmlab"

# module prefix -> layer; the longest prefix decides (llmlab.data is core, llmlab.data.steps a method)
LAYERS = {
    "llmlab.errors": "core", "llmlab.atomic": "core", "llmlab.config": "core", "llmlab.runs": "core",
    "llmlab.models": "core", "llmlab.generation": "core", "llmlab.train": "core", "llmlab.data": "core",
    "llmlab.methods": "methods", "llmlab.peft": "methods", "llmlab.compress": "methods", "llmlab.distill": "methods",
    "llmlab.evaluate": "methods", "llmlab.align": "methods", "llmlab.pretrain": "methods", "llmlab.data.steps": "methods", "llmlab.data.pipeline": "methods",
    "llmlab.data.executors": "methods", "llmlab.data.tasks": "methods", "llmlab.data.tokenizer_train": "methods",
    "llmlab.stages": "stages",
    "llmlab.cli": "top", "llmlab": "top",
}
RANK = {"core": 0, "methods": 1, "stages": 2, "top": 3}


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(root: Path) -> dict[str, set[str]]:
    """module -> the llmlab modules it imports, anywhere in its body, with the packages that implies."""
    mods = modules(root)
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _targets(node, name, is_pkg, mods):
                targets |= {target, *_ancestors(target)} - {name, *_ancestors(name)}
        graph[name] = targets
    return graph


def _targets(node, name: str, is_pkg: bool, mods: dict) -> list[str]:
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = name.split(".") if is_pkg else name.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        wanted = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names]
    else:
        return []
    out = []
    for target in wanted:
        while target not in mods and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in mods and target.split(".")[0] == "llmlab":
            out.append(target)
    return out


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def layer(module: str) -> str:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def violations(root: Path) -> list[str]:
    graph, found = imports(root), []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target in _ancestors(module) or target == "llmlab":
                continue
            if RANK[layer(target)] > RANK[layer(module)]:
                found.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
            elif layer(target) == "stages" and not module.startswith(target):
                found.append(f"{module} imports the stage {target}: only llmlab.cli may")
    return found + [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in comps]


def _cycle_in(graph, comp: set[str]) -> list[str]:
    start = min(comp)
    path, seen = [start], {start}
    while True:
        step = min(w for w in graph[path[-1]] if w in comp)
        if step in seen:
            return path[path.index(step):] + [step]
        path.append(step)
        seen.add(step)


def test_the_package_keeps_its_layers_and_has_no_cycles():
    assert violations(ROOT) == []


def test_every_module_has_a_layer():
    assert all(layer(m) in RANK for m in modules(ROOT))


@pytest.mark.parametrize("victim, planted, expected", [
    ("models/load.py", "def _planted():\n    from llmlab.peft import lora\n", "llmlab.models.load (core) imports llmlab.peft"),
    ("train/losses.py", "from llmlab.compress import gptq\n", "llmlab.train.losses (core) imports llmlab.compress"),
    ("peft/lora.py", "def _planted():\n    from llmlab.stages import finetune\n", "imports llmlab.stages"),
    ("compress/gptq.py", "def _planted():\n    import llmlab.stages.quantize\n", "imports llmlab.stages"),
    ("generation/sampling.py", "def _planted():\n    from llmlab.generation import generate\n", "import cycle"),
    ("models/tiny.py", "from llmlab.models.load import load_model\n", "import cycle"),
])
def test_a_planted_upward_import_or_cycle_is_caught(tmp_path, victim, planted, expected):
    copy = tmp_path / "llmlab"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(copy) == []
    with open(copy / victim, "a", encoding="utf-8") as f:
        f.write("\n\n" + planted)
    assert any(expected in v for v in violations(copy)), violations(copy)


def test_every_method_lives_in_the_methods_layer_and_every_verb_in_a_stage():
    from llmlab import methods
    from llmlab.cli import STAGES

    for family, table in methods.TABLE.items():
        for name, entry in table.items():
            assert layer(entry.module) == "methods", (family, name, entry.module)
    assert {layer(module) for module, *_ in STAGES.values()} == {"stages"}

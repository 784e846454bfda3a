"""The house imports only downward, has no import cycle, and imports at module top.

Layers (docs/architecture.md), lowest first:

1. ``losses``, ``data``, ``synthetic``, ``evaluation``, ``log_keys``: pure functions, loaders and the
   generators of the synthetic sets;
2. ``models``;
3. ``recipe``: the schema, parsed once;
4. ``distill``: the trainer core, task trainers, stages, cache, mimic;
5. ``runner`` (and the ``run.py`` launcher), ``cli``, ``demo``, ``report``, ``__main__``: entry points.

Read from the source with ``ast`` (nothing is imported), so a new cycle or upward import fails
here before it can hide behind a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kd_trainer"
LAYERS = {
    "losses": 1, "data": 1, "synthetic": 1, "evaluation": 1, "det_metrics": 1, "log_keys": 1,
    "models": 2,
    "recipe": 3,
    "distill": 4,
    "run": 5, "runner": 5, "cli": 5, "demo": 5, "report": 5, "plan_view": 5, "__main__": 5, "__init__": 5,
    "search": 5,  # index and rank a folder of images; an entry point (cli) uses it
}
# Optional dependencies may be imported where they are used, so the package works without them.
OPTIONAL = {"onnx", "onnxruntime", "matplotlib", "pycocotools", "faster_coco_eval", "torchmetrics", "torch_npu",
            "deepspeed"}


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS["__init__"]
    return LAYERS[parts[1]]


def _resolve(module: str, node: ast.ImportFrom, path: Path) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(name: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The project modules an import of ``names`` from ``name`` reaches (submodules included)."""
    found = [f"{name}.{n}" for n in names if f"{name}.{n}" in modules]
    return found or ([name] if name in modules else [])


def _imports(module: str, path: Path, modules: dict[str, Path] = MODULES) -> list[tuple[str, bool, int]]:
    """(imported name, at module top?, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    # `if TYPE_CHECKING:` / `if __name__ == ...` blocks at module level count as top level.
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(m) for m in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = _resolve(module, node, path)
            if name.startswith("kd_trainer"):
                out += [(t, id(node) in top, node.lineno) for t in _targets(name, [a.name for a in node.names], modules)]
            else:
                out.append((name, id(node) in top, node.lineno))
    return out


def _graph(modules: dict[str, Path]) -> dict[str, list[str]]:
    return {m: sorted({n for n, _, _ in _imports(m, p, modules) if n in modules} - {m}) for m, p in modules.items()}


GRAPH = _graph(MODULES)


def test_every_module_has_a_layer():
    unknown = sorted(m for m in MODULES if len(m.split(".")) > 1 and m.split(".")[1] not in LAYERS)
    assert not unknown, f"modules outside the layer map (add them to LAYERS): {unknown}"


def test_imports_point_down_only():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in GRAPH.items() for t in targets if _layer(t) > _layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in GRAPH[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_sit_at_module_top():
    inside = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {name}"
              for m, p in MODULES.items() for name, at_top, line in _imports(m, p)
              if not at_top and name.split(".")[0] not in OPTIONAL]
    assert not inside, "imports inside functions (only optional dependencies may be):\n" + "\n".join(inside)


@pytest.mark.parametrize("source, expect", [
    ("from kd_trainer.run import run\n", "upward"),
    ("from kd_trainer.losses import b\n", "cycle"),
    ("def f():\n    import json\n", "inside"),
])
def test_the_checks_can_fail(tmp_path, source, expect):
    """A planted upward import, cycle and function-level import are each caught (in a copy of the
    package's shape under tmp_path, never in the real tree)."""
    pkg = tmp_path / "kd_trainer"
    (pkg / "losses").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "run.py").write_text("")
    (pkg / "losses" / "__init__.py").write_text("")
    (pkg / "losses" / "a.py").write_text(source)
    (pkg / "losses" / "b.py").write_text("from kd_trainer.losses import a\n")
    mods = _modules(pkg)
    graph = _graph(mods)
    m = "kd_trainer.losses.a"
    if expect == "upward":
        assert any(_layer(t) > _layer(m) for t in graph[m])
    elif expect == "cycle":
        assert "kd_trainer.losses.b" in graph[m] and m in graph["kd_trainer.losses.b"]
    else:
        assert any(not top for _, top, _ in _imports(m, mods[m], mods))

"""The shape of the code: imports flow one way between the layers, with no cycles.

methods <- (errors, budget, metrics) <- adapters <- testbed <- protocol <- (evaluation, codebook)
<- (bench, reports) <- cli. A module may import its own package and any lower layer, never a higher
one or a sibling package of its own layer; `methods/` imports nothing of `harness/`. Lazy imports
inside functions count too: they are still dependencies.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Each package (or top-level module) and its layer.
LAYERS = {
    "methods": 0,
    "harness.errors": 0,
    "harness.budget": 1,
    "harness.metrics": 1,
    "harness.adapters": 2,
    "harness.testbed": 3,
    "harness.protocol": 4,
    "harness.evaluation": 5,
    "harness.codebook": 5,
    "harness.lvpruning": 5,
    "harness.bench": 6,
    "harness.reports": 6,
    "harness.cli": 7,
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str | None:
    """The LAYERS entry a module belongs to (longest prefix)."""
    matches = [u for u in LAYERS if module == u or module.startswith(u + ".")]
    return max(matches, key=len) if matches else None


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules of this project that `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in ("harness", "methods")}


SOURCES = sorted(p for d in ("harness", "methods") for p in (ROOT / d).rglob("*.py")
                 if "__pycache__" not in p.parts and p != ROOT / "harness" / "__init__.py")  # the empty root
MODULES = {_module(p) for p in SOURCES}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _unit(m) is None] == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_down_the_layers(path):
    unit = _unit(_module(path))
    wrong = []
    for target in _imports(path):
        if target not in MODULES:  # `from pkg import name` where name is not a module
            continue
        other = _unit(target)
        if other != unit and LAYERS[other] >= LAYERS[unit]:
            wrong.append(f"{target} ({other}, layer {LAYERS[other]})")
    assert not wrong, f"{_module(path)} ({unit}, layer {LAYERS[unit]}) imports upward or sideways: {wrong}"


def test_methods_import_nothing_of_the_harness():
    for path in (ROOT / "methods").rglob("*.py"):
        assert not [m for m in _imports(path) if m.startswith("harness")], path


def test_no_import_cycles():
    """Among the imports a module runs when it is imported (its top-level statements)."""
    graph = {_module(p): {t for t in _imports(p, top_level_only=True) if t in MODULES and t != _module(p)}
             for p in SOURCES}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                # a package importing its own submodules is how packages work, not a cycle
                if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            elif state.get(nxt) is None:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if state.get(module) is None:
            visit(module, [module])


def test_the_checks_see_an_upward_import(tmp_path):
    """The layer test is not vacuous: an evaluation module importing the reports is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from harness.reports import run_folder\n")
    assert "harness.reports.run_folder" in _imports(bad)
    assert LAYERS[_unit("harness.reports.run_folder")] > LAYERS[_unit("harness.evaluation.runner")]

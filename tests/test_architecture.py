"""The package's shape as rules that can break: every module imports, no import cycles (between modules and
between packages, so data flows one way through the pipeline), command lines are the outermost layer, and no
private name is imported across modules. Imports inside functions count too: they are still dependencies."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "muco"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[str, str | None, int]]:
    """(imported muco module, imported name or None, line) for every import statement of a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "muco"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "muco":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (node.module, a.name, node.lineno))
    return out


GRAPH = {m: {t for t, _, _ in imports_of(p) if t in MODULES and t != m} for m, p in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_of(module: str) -> str:
    """The pipeline stage a module belongs to: ``muco.<first part>`` (a top-level module is its own stage)."""
    return ".".join(module.split(".")[:2])


def test_the_graph_sees_the_imports():
    # guards the walker itself: known edges, also from inside functions
    assert "muco.data.stream" in GRAPH["muco.data.datamodule"]
    assert "muco.eval.validation" in GRAPH["muco.train.module"]  # imported inside a method


@pytest.mark.parametrize("name", [m for m in MODULES if not m.endswith("__main__")])
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_import_cycle_between_modules():
    assert cycles(GRAPH) == []


def test_packages_form_a_pipeline_without_cycles():
    stages: dict[str, set[str]] = {}
    for m, targets in GRAPH.items():
        if m == "muco" or package_of(m) == "muco.cli" or m.endswith("__main__"):
            continue  # the command lines (and `python -m` shims) sit on top of everything
        stages.setdefault(package_of(m), set()).update(package_of(t) for t in targets if package_of(t) != package_of(m))
    assert cycles(stages) == [], stages


def test_no_library_module_imports_a_command_line():
    offenders = [f"{m} imports {t}" for m, p in MODULES.items() if package_of(m) != "muco.cli"
                 and not m.endswith("__main__") for t, _, _ in imports_of(p) if package_of(t) == "muco.cli"]
    assert offenders == []


def test_no_private_name_is_imported_across_modules():
    offenders = [f"{p.relative_to(ROOT.parent)}:{line} imports {t}.{name}" for m, p in MODULES.items()
                 for t, name, line in imports_of(p)
                 if name is not None and name.startswith("_") and not name.startswith("__")]
    offenders += [f"{p.relative_to(ROOT.parent)}:{line} imports {t}" for m, p in MODULES.items()
                  for t, name, line in imports_of(p) if name is None and t.split(".")[-1].startswith("_")
                  and not t.split(".")[-1].startswith("__")]
    assert offenders == []

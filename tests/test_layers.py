"""The shape of the code: imports point one way, and the pipeline API knows no Celery.

Read from the source (the AST), so a circle is caught even where Python would import it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workers", "producers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(project modules imported at module level, imports made inside a function)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    nested: list[str] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        names = [f"{base}.{alias.name}" for alias in node.names]
        return [n for n in names if n in known] or [base]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found = [t for t in targets(child) if t.split(".")[0] in PACKAGES]
                if in_function:
                    nested.extend(found)
                else:
                    top.update(t for t in found if t in known)
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            visit(child, inner)

    visit(tree, False)
    return top, nested


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, set(modules))[0] for name, path in modules.items()}


def test_no_import_circle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module)


#: Imports on use that are not about order: an optional dependency.
OPTIONAL = {"workers.sinks": ["workers.sinks.postgres"]}


def test_no_import_inside_a_function_in_workers() -> None:
    """Imports inside functions hid the old circles; the worker code has none, but for an
    optional dependency."""
    nested = {}
    for name, path in project_modules().items():
        if name.startswith("workers"):
            found = imports_of(path, set())[1]
            if found:
                nested[name] = found
    assert nested == OPTIONAL


def test_the_pipeline_api_imports_no_celery_and_builds_nothing() -> None:
    code = (
        "import sys, workers.api, workers.pipelines.demo\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("module", sorted(project_modules()))
def test_each_module_imports_alone(module: str) -> None:
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]

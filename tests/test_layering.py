"""Layering of the project's packages (issue 10), read from the source with `ast` (nothing is
imported): `pipeline` never imports `workflows` or `viz`, and `viz` never imports `workflows`,
whether at module level or inside a function; and the imports that run when a module is
imported (module level, outside `if TYPE_CHECKING:`) form no cycle."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "viz", "workflows")
BELOW = {"pipeline": ("viz", "workflows"), "viz": ("workflows",)}  # package -> packages it must not import


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the project module imported
    where: str  # path:line
    at_import_time: bool  # runs when `source` is imported


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _deepest_module(dotted: str, modules: dict[str, Path]) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: dict[str, Path]) -> list[str]:
    """The project modules one import statement loads (a `from M import name` of a submodule
    names the submodule)."""
    if isinstance(node, ast.Import):
        found = [_deepest_module(alias.name, modules) for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else _deepest_module(base, modules)
                 for alias in node.names]
    return sorted({target for target in found if target is not None})


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(root: Path) -> list[Import]:
    """Every import of a project module by a project module, with whether it runs at import time."""
    modules = project_modules(root)
    return [found for name, path in modules.items() for found in _imports_of(name, path, modules, root)]


def _imports_of(name: str, path: Path, modules: dict[str, Path], root: Path) -> list[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, at_import_time: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.extend(Import(name, target, f"{path.relative_to(root)}:{node.lineno}", at_import_time)
                         for target in _targets(node, package, modules))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            at_import_time = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_import_time)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, at_import_time)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def upward_imports(found: list[Import]) -> list[str]:
    return sorted(f"{i.where}: {i.source} imports {i.target}" for i in found
                  if i.target.split(".")[0] in BELOW.get(i.source.split(".")[0], ()))


def import_cycles(found: list[Import]) -> list[list[str]]:
    """The strongly connected groups (more than one module, or one importing itself) of the
    imports that run at import time."""
    graph: dict[str, set[str]] = {}
    for i in found:
        if i.at_import_time:
            graph.setdefault(i.source, set()).add(i.target)

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in graph.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    reach = {module: reachable(module) for module in graph}
    cycles = {tuple(sorted(m for m in reach if m in reach[module] and module in reach[m]))
              for module in graph if module in reach[module]}
    return sorted(list(cycle) for cycle in cycles)


def test_pipeline_and_viz_never_import_upward():
    assert upward_imports(imports(ROOT)) == []


def test_no_import_cycle_at_import_time():
    assert import_cycles(imports(ROOT)) == []


def test_the_scan_finds_upward_imports_and_cycles(tmp_path):
    sources = {
        "pipeline/__init__.py": "",
        "pipeline/a.py": "def f():\n    from workflows import c\n",
        "pipeline/b.py": "from . import a\nfrom .a import f\n",
        "viz/__init__.py": "",
        "viz/v.py": "import workflows.c as c\nimport numpy\n",
        "workflows/__init__.py": "",
        "workflows/c.py": "from workflows.d import x\n",
        "workflows/d.py": "from typing import TYPE_CHECKING\nimport workflows.c\nif TYPE_CHECKING:\n"
                          "    from workflows import e\n",
        "workflows/e.py": "from .d import y\n",
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = imports(tmp_path)
    assert {(i.source, i.target, i.at_import_time) for i in found} >= {
        ("pipeline.a", "workflows.c", False), ("pipeline.b", "pipeline.a", True),
        ("workflows.d", "workflows.e", False), ("workflows.e", "workflows.d", True)}
    assert upward_imports(found) == ["pipeline/a.py:2: pipeline.a imports workflows.c",
                                     "viz/v.py:1: viz.v imports workflows.c"]
    assert import_cycles(found) == [["workflows.c", "workflows.d"]]


def test_pipeline_never_imports_a_drawing_library():
    """Rendering lives in viz/ (issue 10): no pipeline module imports datashader, holoviews,
    panel or bokeh, not even inside a function."""
    drawing = ("datashader", "holoviews", "panel", "bokeh")
    found = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names
                      if name.split(".")[0] in drawing]
    assert found == []

"""The package's layout, read from the source with `ast` (docs/layout.md, DESIGN section 2).

- `wspo.train` never imports `wspo.precompute` or `wspo.evaluation`: phase two reads shards only;
- `wspo.shards` (the contract) imports neither phase nor the evaluation;
- no import circles among the package's modules, counted twice: once over the imports that run
  when a module is loaded (module level, class bodies included), and once over every import,
  function-level ones too. Function-level imports are legitimate to keep `import wspo` and the
  commands' start-up light (torch, vLLM, Ray on first use), but not to hold a circle together.

What counts as an import of a module: `import wspo.x.y`, `from wspo.x import y` (an import of
`wspo.x.y` when `y` is a submodule, else of `wspo.x`) and relative imports. Parent packages
(`wspo`, `wspo.train`, ...) that Python initialises on the way are not counted as imported,
and imports under `if TYPE_CHECKING:` never run, so neither counts.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

def package_modules() -> dict[str, Path]:
    """Module name -> source file, from pyproject's `package-dir` (folder `train/` is `wspo.train`)."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in package_dir.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported wspo module, function_level, line) for every import statement in `path`."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []

    def owner(module: str) -> str | None:
        while module not in modules and "." in module:
            module = module.rpartition(".")[0]
        return module if module in modules else None

    def visit(node: ast.AST, function_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, function_level)
                continue
            inner = function_level or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1])
                    module = f"{base}.{child.module}" if child.module else base
                else:
                    module = child.module or ""
                submodules = [f"{module}.{alias.name}" for alias in child.names if f"{module}.{alias.name}" in modules]
                targets = submodules + ([module] if len(submodules) < len(child.names) else [])
            for target in targets:
                if target == "wspo" or target.startswith("wspo."):
                    resolved = owner(target)
                    if resolved is not None and resolved != name:
                        found.append((resolved, function_level, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def import_graph(function_level: bool) -> dict[str, dict[str, int]]:
    """importer -> {imported: line}; module-level imports only, or function-level ones too."""
    modules = package_modules()
    graph = {name: {} for name in modules}
    for name, path in modules.items():
        for imported, lazy, line in imports_of(name, path, modules):
            if function_level or not lazy:
                graph[name].setdefault(imported, line)
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _describe(graph, component) -> str:
    return "; ".join(f"{a} -> {b} (line {graph[a][b]})" for a in component for b in graph[a] if b in component)


def _phase(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "wspo"


def test_the_reader_sees_the_imports_it_should():
    """The scanner itself: known imports of each kind are found, so the checks below can fail."""
    module_level, every = import_graph(False), import_graph(True)
    assert "wspo.shards.store" in module_level["wspo.precompute.pipeline"]  # from wspo.shards.store import (...)
    assert "wspo.precompute.config" in module_level["wspo.precompute.pipeline"]  # from .config import ...
    assert "wspo.train.losses" in module_level["wspo.train.preference"]  # from . import losses
    assert "wspo.shards.trl_export" in every["wspo.shards.store"]  # function level (ShardSet.to_trl_dpo)
    assert "wspo.shards.trl_export" not in module_level["wspo.shards.store"]
    assert "wspo.shards.store" not in every["wspo.shards.trl_export"]  # under TYPE_CHECKING only
    assert circles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("phase, forbidden", [("train", ("precompute", "evaluation")),
                                              ("shards", ("precompute", "train", "evaluation"))])
def test_phase_boundaries(phase, forbidden):
    graph = import_graph(True)
    crossings = [f"{a} -> {b} (line {line})" for a, targets in graph.items() if _phase(a) == phase
                 for b, line in targets.items() if _phase(b) in forbidden]
    assert crossings == [], f"wspo.{phase} must not import {', '.join(forbidden)}: {crossings}"


def test_no_import_circles_at_module_level():
    graph = import_graph(False)
    found = circles(graph)
    assert found == [], " | ".join(_describe(graph, c) for c in found)


def test_no_import_circles_counting_function_level_imports():
    graph = import_graph(True)
    found = circles(graph)
    assert found == [], " | ".join(_describe(graph, c) for c in found)


# The format's name and the versions a manifest is written with and checked against.
MANIFEST_FORMAT = ("FORMAT_NAME", "FORMAT_VERSION", "TOPK_FORMAT_VERSION")


def test_the_manifest_is_built_and_read_in_shards_manifest_only():
    """DESIGN section 2: the manifest is the contract's. Only wspo.shards.manifest uses the format's
    name and versions (imports them, reads them), so no other module builds a manifest's header
    or checks a manifest's version; schema.py and topk.py only define them."""
    users = set()
    for name, path in package_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and any(alias.name in MANIFEST_FORMAT for alias in node.names):
                users.add(name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in MANIFEST_FORMAT:
                users.add(name)
            elif isinstance(node, ast.Attribute) and node.attr in MANIFEST_FORMAT:
                users.add(name)
    assert users == {"wspo.shards.manifest"}, f"modules using {', '.join(MANIFEST_FORMAT)}: {sorted(users)}"

"""The core's import graph has no cycle, neither the core nor a plugin imports momkit inside a function, and
built-in plugins import only the core (and their own package), never each other.

The Triton backend alone imports its kernel modules on first call: they import Triton, an optional dependency.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FOLDERS = {"momkit": ROOT / "momkit", "momkit.plugins": ROOT / "plugins", "momkit.kernels": ROOT / "kernels"}


def modules(package: str) -> dict[str, Path]:
    """``{dotted name: path}`` of every module of ``package`` (its folder as laid out in the repository)."""
    folder = FOLDERS[package]
    found = {}
    for path in folder.rglob("*.py"):
        parts = path.relative_to(folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((package, *parts))] = path
    return found


CORE = {name: path for name, path in modules("momkit").items()
        if not name.startswith(("momkit.plugins", "momkit.kernels"))}


def imported(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """``(module, inside a function)`` for each import of a ``momkit`` module by the module ``name``."""
    tree = ast.parse(path.read_text())
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found += [(t, id(node) in functions) for t in targets if t == "momkit" or t.startswith("momkit.")]
    return found


def test_core_imports_form_no_cycle():
    known = set(CORE)
    graph = {name: {t for t, _ in imported(name, path, known) if t in known and t != name}
             for name, path in CORE.items()}
    graph["momkit"] = set()  # the package only gathers the public names; core modules must not import it
    importers_of_package = sorted(name for name, edges in graph.items() if "momkit" in edges)
    assert not importers_of_package, f"core modules importing the momkit package itself: {importers_of_package}"
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("package", ["momkit", "momkit.plugins"])
def test_no_module_imports_momkit_inside_a_function(package):
    every = {**modules("momkit"), **modules("momkit.plugins"), **modules("momkit.kernels")}
    late = [(name, target) for name, path in modules(package).items()
            for target, inside in imported(name, path, set(every)) if inside]
    assert not late, f"imports of momkit inside functions: {late}"


def test_plugins_import_only_the_core_and_their_own_package():
    every = {**CORE, **modules("momkit.plugins"), **modules("momkit.kernels")}
    crossing = []
    for name, path in {**modules("momkit.plugins"), **modules("momkit.kernels")}.items():
        own = ".".join(name.split(".")[:3])
        for target, _ in imported(name, path, set(every)):
            if target.startswith(("momkit.plugins", "momkit.kernels")) and not target.startswith(own):
                crossing.append((name, target))
    assert not crossing, f"plugins importing other plugins: {crossing}"

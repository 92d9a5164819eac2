"""The package layout (docs/design.md §3) read from the source: the import graph has no cycle, each wing
imports only the layers below it, and no module grows past the size a reader can hold."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bissl_fast"
MAX_LINES = 450

# What each wing may import besides itself; everything outside the wings and the CLI is the library core,
# which imports only the core. The CLI (also run as `python -m bissl_fast`) dispatches to every wing.
WINGS = {
    "bissl_fast.data": {"core"},
    "bissl_fast.train": {"core"},
    "bissl_fast.experiments": {"core", "bissl_fast.data", "bissl_fast.train"},
    "bissl_fast.bench": {"core", "bissl_fast.train"},
}
ENTRY_POINTS = {"bissl_fast.cli", "bissl_fast.__main__"}


def _modules() -> dict[str, Path]:
    """Module name -> file for every source file of the package (the shipped suites are not the package's code)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        if rel.parts[:3] == ("bissl_fast", "bench", "suites"):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (top level, functions, TYPE_CHECKING)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            candidates = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry"
    for wing in WINGS:
        if module == wing or module.startswith(wing + "."):
            return wing
    return "core"


def test_the_source_is_where_the_test_reads_it():
    modules = _modules()
    assert "bissl_fast.train.trainer" in modules and "bissl_fast.experiments.pipeline.runner" in modules
    assert _imports("bissl_fast.train.trainer", modules["bissl_fast.train.trainer"], modules) >= {
        "bissl_fast.train.config", "bissl_fast.train.stage", "bissl_fast._dist"}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_each_layer_imports_only_what_lies_below_it():
    wrong = []
    for module, targets in sorted(_graph().items()):
        layer = _layer(module)
        if layer == "entry":
            continue
        allowed = {layer, "core"} | WINGS.get(layer, set())
        wrong += [f"{module} imports {target}" for target in sorted(targets) if _layer(target) not in allowed]
    assert not wrong, "imports against the layering of docs/design.md §3:\n" + "\n".join(wrong)


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_a_planted_cycle_and_a_planted_upward_import_are_seen(tmp_path, monkeypatch):
    """The checks above are not vacuous: a copy of the package with a core module importing the trainer fails both."""
    import shutil

    copy = tmp_path / "bissl_fast"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("suites", "*.so", "__pycache__"))
    (copy / "_types.py").write_text((copy / "_types.py").read_text() + "\nfrom .train.trainer import BiSSLTrainer\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", copy)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="bissl_fast._types imports bissl_fast.train.trainer"):
        test_each_layer_imports_only_what_lies_below_it()

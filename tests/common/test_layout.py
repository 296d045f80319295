"""The package's shape, read with ``ast`` (no import): the layers of ``mine/`` import only downwards, no import cycle,
no private name imported from another module, every subpackage's ``__init__`` names its modules, no function over
80 lines outside ``cli/``."""

from __future__ import annotations

import ast
from pathlib import Path

import ovseg_mine

PACKAGE = Path(ovseg_mine.__file__).parent
#: mine/'s layers, lowest first: each imports only those before it (and mine/errors.py, and the shared modules).
MINE_LAYERS = ["sources", "algorithms", "graph", "run"]


def _module_name(path: Path) -> str:
    parts = ["ovseg_mine", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.Module, modules: dict) -> list[tuple[str, list[str]]]:
    """(module imported, names) for every ``from ovseg_mine... import`` and ``import ovseg_mine...`` in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ovseg_mine"):
            names = [alias.name for alias in node.names]
            for name in names:  # ``from ovseg_mine.mine.run import driver`` imports the module driver
                if f"{node.module}.{name}" in modules:
                    found.append((f"{node.module}.{name}", []))
            found.append((node.module, [n for n in names if f"{node.module}.{n}" not in modules]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("ovseg_mine")]
    return found


def test_the_layers_of_mine_import_only_downwards():
    modules = _modules()
    upward = []
    for name, tree in modules.items():
        parts = name.split(".")
        if len(parts) < 4 or parts[1] != "mine" or parts[2] not in MINE_LAYERS:
            continue
        for target, _ in _imports(tree, modules):
            to = target.split(".")
            if len(to) > 2 and to[1] == "mine" and to[2] in MINE_LAYERS:
                if MINE_LAYERS.index(to[2]) > MINE_LAYERS.index(parts[2]):
                    upward.append(f"{name} imports {target}")
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    modules = _modules()
    graph = {
        name: {t for t, _ in _imports(tree, modules) if t in modules and t != name} for name, tree in modules.items()
    }
    # a package's __init__ re-exporting its modules is not a cycle through the package
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    modules = _modules()
    private = [
        f"{name} imports {target}.{n}"
        for name, tree in modules.items()
        for target, names in _imports(tree, modules)
        for n in names
        if n.startswith("_") and not n.startswith("__") and target != name
    ]
    assert not private, "\n".join(private)


def test_every_subpackage_names_its_modules():
    unnamed = []
    for init in PACKAGE.rglob("__init__.py"):
        if init.parent == PACKAGE:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for module in init.parent.glob("*.py"):
            if module.name != "__init__.py" and module.stem not in doc:
                unnamed.append(str(module.relative_to(PACKAGE)))
    assert not unnamed, "\n".join(unnamed)


def test_no_function_over_80_lines_outside_the_cli():
    long = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)

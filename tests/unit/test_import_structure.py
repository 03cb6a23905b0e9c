"""The package's import graph: no circles, models stay plain PyTorch, command-line code sits on top."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = "ijepa_scale"
# Wrapping, sharding, data loading and cluster launch are applied from outside the model files.
MODEL_FORBIDDEN = ("torch.distributed", "submitit", "webdataset", "fsspec")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PKG).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module as written, absolute; names taken from it) for every import statement, nested ones too."""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            head = node.module or ""
            if node.level:
                stem = base[: len(base) - node.level + 1]
                head = ".".join(stem + ([node.module] if node.module else []))
            found.append((head, [alias.name for alias in node.names]))
    return found


def _internal(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for head, names in _imports(module, path):
            for target in [head] + [f"{head}.{n}" for n in names]:
                inner = _internal(target)
                # A package's own submodules are not an edge back to it (its __init__ re-exports them).
                if inner and inner != module and not inner.startswith(module + "."):
                    edges.add(inner)
        graph[module] = edges
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return circles


def test_no_import_circles():
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_models_are_plain_pytorch():
    offenders = []
    for module, path in MODULES.items():
        if not module.startswith(f"{PKG}.models"):
            continue
        for head, _ in _imports(module, path):
            inner = _internal(head)
            outside = inner and not inner.startswith(f"{PKG}.models") and inner != f"{PKG}.errors"
            if head.startswith(MODEL_FORBIDDEN) or outside:
                offenders.append(f"{module} imports {head}")
    assert offenders == []


def test_only_the_command_table_imports_commands():
    offenders = [f"{module} imports {target}" for module, targets in _graph().items() for target in targets
                 if target.startswith(f"{PKG}.commands") and not module.startswith((f"{PKG}.commands", f"{PKG}.cli"))]
    assert offenders == []


def test_no_private_names_cross_packages():
    """`from ijepa_scale.x import _name` only within x's own package."""
    offenders = []
    for module, path in MODULES.items():
        for head, names in _imports(module, path):
            inner = _internal(head)
            if not inner or inner == module:
                continue
            same_package = inner.rpartition(".")[0] == module.rpartition(".")[0] or inner.startswith(module + ".")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and not same_package:
                offenders.append(f"{module} takes {private} from {inner}")
    assert offenders == []

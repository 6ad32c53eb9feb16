"""The layers import one way: no module of fastcore5 (its kernels included) imports, directly or
through others, a module that imports it back (ARCHITECTURE.md, "Rules").

The graph is read from the source with ast, nothing is imported. Every import counts the same,
wherever it stands: at module level, inside a function (a lazy import still says "this module
needs that one", and a circle through one only waits for the first call to bite), or under
``if TYPE_CHECKING`` (a type that has to come from above says the module sits in the wrong layer).
``importlib.import_module`` with a literal name counts too. What is not an edge: the implicit
import of the packages above a module (``fastcore5/__init__.py`` re-exports the public API, so
every module would otherwise sit on a circle through it) and a dynamic name.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "fastcore5"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name. fastcore5/kernels is the top-level kernels/
    folder (a link), walked like any other subpackage."""
    paths = [
        Path(folder, file)
        for folder, _, files in os.walk(PACKAGE_ROOT, followlinks=True)
        for file in files
        if file.endswith(".py")
    ]
    return {_module_name(p): p for p in paths}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of the package that ``name`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the module pkg.sub when there is one, else pkg's name.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_graph_sees_the_layers():
    """The reader finds the edges the layering rests on, so an empty list of circles means
    something: relative, absolute, function-level and importlib imports, and the kernels."""
    graph = import_graph()
    assert "fastcore5.kernels.sgd" in graph["fastcore5.ops.sgd"]  # function-level, relative, via the link
    assert "fastcore5.backends" in graph["fastcore5.ops.linear_relu"]  # from .. import backends
    assert "fastcore5.kernels._common" in graph["fastcore5.kernels.sgd"]
    assert "fastcore5._native_ops" in graph["fastcore5.backends"]  # importlib.import_module("...")
    assert "fastcore5.optim" in graph["fastcore5.bench.bench_sgd"]  # absolute


def test_the_finder_reports_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles (each a set of modules that reach one another): " + "; ".join(
        " <-> ".join(component) for component in found
    )


def test_kernels_know_nothing_of_the_rest_of_fastcore5():
    graph = import_graph()
    outside = {
        name: sorted(t for t in targets if not t.startswith("fastcore5.kernels"))
        for name, targets in graph.items()
        if name.startswith("fastcore5.kernels")
    }
    assert not {name: targets for name, targets in outside.items() if targets}


def test_fastcore5_kernels_is_the_top_level_kernels_folder():
    """One link, in the source tree, says where fastcore5.kernels comes from (ARCHITECTURE.md);
    setup.py maps nothing, so editable installs, wheels and sdists all follow the link."""
    link = PACKAGE_ROOT / "kernels"
    assert link.is_symlink() and link.resolve() == PACKAGE_ROOT.parent / "kernels"


# The rows of ARCHITECTURE.md's diagram, lowest first: a module may import its own row and the rows
# below. The package itself (fastcore5/__init__.py, the public facade) sits in the top row: the
# entry points use the public API as a user would.
LAYERS = (
    ("fastcore5.kernels", "fastcore5._native_ops", "fastcore5.reference", "fastcore5._checks", "fastcore5._op_shapes",
     "fastcore5.index_errors", "fastcore5._output_paths"),
    ("fastcore5.backends",),
    ("fastcore5.ops", "fastcore5.cpu_cache"),
    ("fastcore5.nn", "fastcore5.optim", "fastcore5.interpret"),
    ("fastcore5.cli", "fastcore5.__main__", "fastcore5.demo", "fastcore5.bench", "fastcore5.fastai"),
)


def _layer(module: str) -> int:
    if module == "fastcore5":
        return len(LAYERS) - 1
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of ARCHITECTURE.md: add it to LAYERS and to the diagram")


def test_every_import_points_down_the_layers_of_the_architecture():
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in import_graph().items()
        for target in targets
        if _layer(target) > _layer(name)
    )
    assert not upward, "imports of a higher layer (ARCHITECTURE.md): " + "; ".join(upward)

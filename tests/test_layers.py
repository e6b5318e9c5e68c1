"""The core's dependency rule, checked from the source: layers import downward only, no cycles.

Every ``import`` in ``core/`` counts, deferred ones inside functions too (a deferred import
hides a cycle from Python, not from this test); only ``if TYPE_CHECKING:`` blocks are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "core"

# Bottom to top. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("config",),
    ("registry",),
    ("attention",),
    ("nn",),
    ("data", "objectives", "generation", "diffusion"),
    ("io",),
    ("models",),
    ("train",),
    ("eval",),
    ("api",),
    ("builtin", "cli", "testing", "__init__", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["polymodal", *parts])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The ``polymodal`` modules that ``path`` imports (resolved to modules of the core)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith("polymodal"):
                while name and name not in modules:  # an attribute of a module: its module
                    name = name.rpartition(".")[0]
                if name and name != me:
                    found.add(name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def graph() -> dict[str, set[str]]:
    files = sorted(CORE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, modules) for p in files}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_core_module_has_a_layer():
    unknown = sorted(m for m in graph() if layer_of(m) not in RANK)
    assert not unknown, f"core modules outside every layer (add them to LAYERS): {unknown}"


def test_core_never_imports_a_plugin_or_a_benchmark():
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("polymodal.plugins", "bench")), f"{path}: imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(("polymodal.plugins", "transformers", "diffusers")), (
                        f"{path}: imports {alias.name}"
                    )


def test_layers_import_downward_only():
    upward = []
    for module, imports in graph().items():
        for target in imports:
            if RANK[layer_of(target)] > RANK[layer_of(module)]:
                upward.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_core():
    # A package's __init__ re-exporting its own modules is not a cycle through them.
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and t != "polymodal")} for m, ts in graph().items()}
    edges = {m: ts - {"polymodal"} for m, ts in edges.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "edges, cyclic",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"a"}}, True),
    ],
)
def test_the_cycle_finder_finds_cycles(edges, cyclic):
    assert (find_cycle(edges) is not None) is cyclic


def test_the_layer_check_sees_deferred_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "core"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "nn" / "__init__.py").write_text("")
    (pkg / "nn" / "block.py").write_text("def f():\n    from polymodal.api import load\n")
    (pkg / "api.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "CORE", pkg)
    assert graph()["polymodal.nn.block"] == {"polymodal.api"}
    with pytest.raises(AssertionError, match="polymodal.nn.block"):
        test_layers_import_downward_only()

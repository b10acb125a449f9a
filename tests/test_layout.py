"""The package's layers, read from its source: no import cycle (function-level
imports included, since a deferred import hides a cycle but does not remove
it), and no module imports from a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "optiscope"

#: Bottom to top. A module belongs to the first layer with a matching prefix.
LAYERS = [
    (
        "rules",
        [
            "optiscope._checks",
            "optiscope._io",
            "optiscope.reference",
            "optiscope.rules",
        ],
    ),
    ("kernels", ["optiscope.kernels"]),
    ("probes", ["optiscope.probes.plot!", "optiscope.probes"]),
    (
        "optimizers and dropout",
        [
            "optiscope._optimizer",
            "optiscope.adam",
            "optiscope.momentum",
            "optiscope.dropout",
            "optiscope.functional",
        ],
    ),
    ("applications", ["optiscope"]),
]


def layer(module: str) -> int:
    for level, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.endswith("!"):  # excluded from this layer
                if module == prefix[:-1] or module.startswith(prefix[:-1] + "."):
                    break
                continue
            if module == prefix or module.startswith(prefix + "."):
                return level
    raise AssertionError(f"{module} is in no layer")


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:
                full = f"{stem}.{alias.name}"
                targets.add(full if full in known else stem)
    return {t for t in targets if t in known and t != name}


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_has_a_layer() -> None:
    for name in GRAPH:
        layer(name)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path that ends where it starts, or None."""
    colour: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if colour.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in colour and (cycle := visit(target)):
                return cycle
        path.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_search_finds_a_planted_cycle() -> None:
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(planted) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_only_from_its_layer_or_below(name) -> None:
    upward = [t for t in GRAPH[name] if layer(t) > layer(name)]
    assert not upward, f"{name} ({LAYERS[layer(name)][0]}) imports from above: {upward}"

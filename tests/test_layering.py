"""Lower floors never import upper ones: the import graph between tidar_jax's subpackages/modules has no cycle.

Every import counts, the lazy ones inside functions included (a lazy import is still an arrow). A cycle means some
package reaches back up into one that builds on it, as ``tidar_jax.checkpoint`` once did into ``tidar_jax.hf``.
"""

from __future__ import annotations

import ast
import os

import tidar_jax

ROOT = os.path.dirname(tidar_jax.__file__)


def _unit(module: str) -> str:
    """``tidar_jax.hf.load`` -> ``hf``; ``tidar_jax`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            src = _unit(rel.removesuffix(".__init__"))
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets = [node.module]
                else:
                    continue
                for t in targets:
                    if t.startswith("tidar_jax.") and _unit(t) != src:
                        edges.setdefault(src, set()).add(_unit(t))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_sees_a_back_edge():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_runs_back_up():
    edges = import_graph()
    assert "hf" in edges.get("loading", set()) and "checkpoint" in edges.get("hf", set())  # the graph is read
    cycle = find_cycle(edges)
    assert cycle is None, f"import cycle between tidar_jax packages: {' -> '.join(cycle)}"
    assert "hf" not in edges.get("checkpoint", set()), "tidar_jax.checkpoint imports tidar_jax.hf"

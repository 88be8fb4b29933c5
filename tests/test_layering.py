"""Lower floors never import upper ones: the import graph between tidar_jax's subpackages/modules has no cycle,
the runtime imports nothing from the analysis floor (``tidar_jax.analysis``) nor from the tools (``benchmarks``),
and no library module names a path under ``benchmarks/`` (what the library does never depends on which results
sit in a checkout).

Every import counts, the lazy ones inside functions included (a lazy import is still an arrow). A cycle means some
package reaches back up into one that builds on it (``tidar_jax.checkpoint`` into ``tidar_jax.hf``, say).
"""

from __future__ import annotations

import ast
import os
import re

import tidar_jax

ROOT = os.path.dirname(tidar_jax.__file__)
ANALYSIS = "analysis"  # the floor above the runtime: it reads the runtime, never the reverse


def _unit(module: str) -> str:
    """``tidar_jax.hf.load`` -> ``hf``; ``tidar_jax`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def library_modules():
    """``(module name, parsed tree)`` of every module of the library."""
    for dirpath, _, files in os.walk(ROOT):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                with open(path) as f:
                    yield rel.removesuffix(".__init__"), ast.parse(f.read(), path)


def imports(tree) -> list[str]:
    """Every absolute module a tree imports (``from x import y`` counts as ``x``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, tree in library_modules():
        src = _unit(module)
        for t in imports(tree):
            if t.startswith("tidar_jax.") and _unit(t) != src:
                edges.setdefault(src, set()).add(_unit(t))
    return edges


_BENCHMARKS_PATH = re.compile(r"(^|[/\\])benchmarks([/\\]|$)")


def benchmark_paths(tree) -> list[str]:
    """String constants that name a path under ``benchmarks/`` (a path literal, or ``"benchmarks"`` as a path
    component), docstrings left out (they may say where a tool lives)."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings and _BENCHMARKS_PATH.search(n.value)]


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


def test_runtime_imports_neither_analysis_nor_benchmarks():
    edges = import_graph()
    assert ANALYSIS in edges and "decode" in edges[ANALYSIS]  # the analysis floor exists and reads the runtime
    up = sorted(src for src, dst in edges.items() if src != ANALYSIS and ANALYSIS in dst)
    assert not up, f"runtime modules import tidar_jax.analysis: {', '.join(up)}"
    tools = sorted(m for m, tree in library_modules() if any(t.split(".")[0] == "benchmarks" for t in imports(tree)))
    assert not tools, f"library modules import benchmarks: {', '.join(tools)}"


def test_no_library_module_names_a_path_under_benchmarks():
    probe = ast.parse('"""benchmarks/x.py writes it"""\nP = os.path.join(ROOT, "benchmarks", "results")\n'
                      'Q = "benchmarks/results/a.json"\nR = "my_benchmarks_dir"')
    assert sorted(benchmark_paths(probe)) == ["benchmarks", "benchmarks/results/a.json"]  # the check sees paths
    found = {m: paths for m, tree in library_modules() if (paths := benchmark_paths(tree))}
    assert not found, f"library modules name paths under benchmarks/: {found}"

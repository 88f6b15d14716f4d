"""The floors of the house, checked from the source: who may import whom, and no import cycles."""
import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ground", "cluster", "experts", "ensemble", "flows")
# package -> the project packages it may import (besides itself)
MAY_IMPORT = {"ground": set(), "cluster": {"ground"}, "experts": {"ground"},
              "ensemble": {"ground", "cluster", "experts"}, "flows": {"ground", "cluster", "experts", "ensemble"}}
HEAVY = ("torch", "transformers", "sentence_transformers", "matplotlib", "prefect", "prefect_ray", "prefect_dask",
         "ray", "sklearn", "scipy", "umap", "safetensors", "datasets", "tokenizers", "tqdm", "lm_eval", "uvicorn",
         "fastapi", "openai", "fcntl")
# project modules that import an optional extra at their top, so that their importers must import them lazily
OPTIONAL = {"ensemble.harness": "lm_eval (the eval extra)"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module top level?) for every import statement of a file; ``from pkg import mod``
    counts as importing ``pkg.mod`` when that is a module, else ``pkg``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    known = modules() if path.is_relative_to(ROOT) else {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full if full in known else node.module, id(node) in top))
    return found


def project_target(name: str, known: dict) -> str | None:
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


@pytest.fixture(scope="module")
def graph():
    known = modules()
    edges = defaultdict(set)
    where = {}
    for mod, path in known.items():
        for name, at_top in imports(path):
            target = project_target(name, known)
            if target and target != mod:
                edges[mod].add(target)
                where[(mod, target)] = at_top
    return known, edges, where


def test_each_package_imports_only_the_floors_below_it(graph):
    known, edges, _ = graph
    bad = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
           if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in MAY_IMPORT[a.split(".")[0]]]
    assert not bad, bad


def test_only_flows_imports_prefect():
    bad = [f"{mod} imports {name}" for mod, path in modules().items() for name, _ in imports(path)
           if name.split(".")[0] in ("prefect", "prefect_ray", "prefect_dask") and not mod.startswith("flows")]
    assert not bad, bad


def test_project_imports_are_at_the_top_of_modules(graph):
    _, _, where = graph
    lazy = [f"{a} -> {b}" for (a, b), at_top in where.items() if not at_top and b not in OPTIONAL]
    assert not lazy, lazy


def test_no_import_cycle_between_files_or_folders(graph):
    known, edges, _ = graph
    folders = defaultdict(set)
    for a, targets in edges.items():
        for b in targets:
            if a.split(".")[0] != b.split(".")[0]:
                folders[a.split(".")[0]].add(b.split(".")[0])
    for g in (edges, folders):
        cycle = _find_cycle(g)
        assert cycle is None, " -> ".join(cycle)


def _find_cycle(g: dict) -> list | None:
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_lazy_imports_are_only_of_heavy_third_party_libraries():
    bad = []
    for mod, path in modules().items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{mod}: {n}" for n in names if n.split(".")[0] not in HEAVY and n not in OPTIONAL]
    assert not bad, bad


def direct_npy_loads(source: str) -> list[int]:
    """Lines of ``np.load`` / ``numpy.load`` calls in a module's source."""
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy")]


def test_library_reads_npy_files_only_through_ground_arrays():
    """np.load in two threads at once can raise SystemError on CPython 3.11 (ground/arrays.py says why)."""
    bad = [f"{mod}:{line}" for mod, path in modules().items() if mod != "ground.arrays"
           for line in direct_npy_loads(path.read_text())]
    assert not bad, bad


def test_the_rule_catches_what_it_is_meant_to(tmp_path):
    """The checks themselves can fail: a cycle is found, an upward import is named."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from ensemble.api import Ensemble\n")
    assert imports(bad) == [("ensemble.api", False)]
    assert direct_npy_loads("import numpy as np\nx = 1\ny = np.load('a.npy', mmap_mode='r')\n") == [3]

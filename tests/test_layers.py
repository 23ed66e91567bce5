"""The package's shape: no import cycles, no imports hidden inside functions (except optional or
TF-only libraries), and the public entry points notebooks use still import. The layer contracts
themselves are import-linter's (``make test`` runs ``lint-imports`` first)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import numpy as np

PACKAGE = Path(__file__).resolve().parents[1] / "kseg"
# Imported where they are used: optional (Pillow, pycocotools, dask, keras_hub: the [hub] extra, only
# for "keras_hub:<folder>" encoders) or backend-specific (TensorFlow, JAX) libraries, so importing
# kseg needs neither.
LOCAL_IMPORTS_ALLOWED = {"tensorflow", "jax", "PIL", "pycocotools", "dask", "distributed", "keras_hub"}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the import cycles."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_kseg_has_no_import_cycle():
    graph = grimp.build_graph("kseg")
    edges = {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}
    assert _cycles(edges) == []


def test_no_kseg_module_imports_inside_a_function():
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                hidden += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}" for name in names
                           if name.split(".")[0] not in LOCAL_IMPORTS_ALLOWED]
    assert hidden == []


def test_public_entry_points_still_import():
    import kseg.data.weights
    import kseg.metrics
    import kseg.models
    import kseg.rle
    from kseg.codecs import rle
    from kseg.metrics import masks
    from kseg.tasks import base

    assert kseg.rle.encode is rle.encode and kseg.rle.decode is rle.decode
    assert kseg.metrics.iou_map is masks.iou_map
    assert callable(kseg.data.weights.unet_weight_map)
    assert kseg.models.load_model is base.load_model
    assert kseg.models.build_model("unet", depth=2, base_filters=4).count_params() > 0
    assert kseg.rle.encode(np.eye(3, dtype=np.uint8)) == "1 1 5 1 9 1"
    np.testing.assert_array_equal(kseg.rle.decode("1 1 5 1 9 1", (3, 3)), np.eye(3, dtype=np.uint8))

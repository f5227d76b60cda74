"""The package's shape: inference never imports training, no import cycles, a small public face.

The import graph is read from the source (every ``import`` statement, including the lazy ones
inside functions), so a dependency hidden in a function body counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "consistent_diffusion"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE
# What inference uses: loading models, running methods, making series, scoring them.
INFERENCE = ("core", "models", "methods", "series", "metrics", "testing")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in SOURCE.rglob("*.py")}


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Package modules one import statement names (``from a import b`` -> ``a.b`` if that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    if target.split(".")[0] != PACKAGE:
        return []
    return [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges: set[str] = set()
        for node in ast.walk(tree):
            edges.update(target for target in _imported(node, name, path.name == "__init__.py", known) if target in known)
        graph[name] = edges - {name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module reachable from ``start``, mapped to the module that imports it (for the error)."""
    seen, stack = {start: ""}, [start]
    while stack:
        current = stack.pop()
        for target in sorted(graph.get(current, ())):
            if target not in seen:
                seen[target] = current
                stack.append(target)
    return seen


def _chain(parents: dict[str, str], end: str) -> str:
    path = [end]
    while parents[path[-1]]:
        path.append(parents[path[-1]])
    return " -> ".join(reversed(path))


def _is_inference(module: str) -> bool:
    parts = module.split(".")
    return len(parts) > 1 and parts[1] in INFERENCE


def test_import_graph_reads_lazy_and_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("def f():\n    from consistent_diffusion.other import thing\n")
    (package / "other.py").write_text("thing = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "SOURCE", package)
    graph = import_graph()
    assert graph[f"{PACKAGE}.sub"] == {f"{PACKAGE}.sub.leaf"}
    assert graph[f"{PACKAGE}.sub.leaf"] == {f"{PACKAGE}.other"}


def test_inference_modules_never_import_training():
    graph = import_graph()
    offences = []
    for module in sorted(graph):
        if not _is_inference(module):
            continue
        parents = _reachable(graph, module)
        offences += [_chain(parents, target) for target in parents if target.startswith(f"{PACKAGE}.training")]
    assert not offences, "inference code reaches training:\n" + "\n".join(offences[:10])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
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
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_methods_and_metrics_do_not_parse_arguments():
    modules = _modules()
    for name, path in modules.items():
        if _is_inference(name) or name.startswith(f"{PACKAGE}.bench") or name.startswith(f"{PACKAGE}.training"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
            used |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
            used |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
            parsing = used & {"ArgumentParser", "parse_args", "parse_known_args", "add_argument"}
            # (argparse.Namespace may appear: released checkpoints pickle one, allowed when unpickling)
            assert not parsing, f"{name} parses arguments ({sorted(parsing)}): argument parsing lives in cli/"


@pytest.mark.parametrize("statement", [
    "from consistent_diffusion import load_pipeline, generate_series, get_method, available_methods, SeriesConfig, score",
])
def test_public_face(statement):
    code = f"{statement}; import sys; print(any(m.startswith('consistent_diffusion.training') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_loading_the_package_is_cheap():
    code = "import consistent_diffusion, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

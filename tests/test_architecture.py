"""The package's shape, checked statically: no import cycles between its parts, ``opacus/utils``
kept small, every function simple enough for ``flake8 --max-complexity 10``, nothing
privacy-breaking shipped.

The import graph is read from the source with ``ast`` (nothing is executed).  Its nodes are the
parts of the package: each subpackage (``opacus.data_loader``, ``opacus.grad_sample``,
``opacus.optimizers``, ...) and each top-level module (``opacus.privacy_engine``, ...).  Every
import counts, including those inside functions: an import deferred into a function to dodge a
cycle is still a cycle.  A *re-export module* (only a docstring, imports and ``__all__``: how a
module that moved stays importable at its Opacus 1.6 path) is looked through: importing it means
depending on what it re-exports.
"""

import ast
import os
import subprocess
import sys
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "opacus")

#: Modules that sit in ``opacus/utils`` but belong to another part; the graph counts them there.
#: Keep this short: each entry is a move not yet made, with the reason. Empty: the last one, the
#: Poisson samplers, moved onto the data path (``opacus/data_loader/samplers.py``; their 1.6
#: path ``opacus.utils.uniform_sampler`` is a re-export).
ASSIGNED_ELSEWHERE: dict = {}

#: Imports left out of the graph, each a cycle not yet removed, with how to remove it. Empty: the
#: last one (the optimizer factory reading the grad-sample modes table) went when the optimizer
#: facts of each mode moved into ``opacus.optimizers.families``.
KNOWN_IMPORTS: set = set()


def _module_files():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
                is_package = rel[-1] == "__init__"
                if is_package:
                    rel = rel[:-1]
                yield ".".join(rel), path, is_package


def _imports(module, tree, is_package):
    """Every ``opacus`` module ``module`` imports, anywhere in its source."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                targets = [".".join(base + ([node.module] if node.module else []))]
            else:
                targets = [node.module or ""]
            # ``from package import submodule`` imports the submodule.
            targets += [f"{targets[0]}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "opacus" or target.startswith("opacus."):
                yield target


def _is_reexport(tree) -> bool:
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and getattr(node.targets[0], "id", None) == "__all__"
        ):
            continue
        return False
    return True


def _part(module: str) -> str:
    """``opacus.grad_sample.linear`` -> ``opacus.grad_sample``; top-level modules are parts."""
    if module in ASSIGNED_ELSEWHERE:
        return ASSIGNED_ELSEWHERE[module]
    return ".".join(module.split(".")[:2])


def import_graph():
    """``{part: {part: [(module, imported module), ...]}}`` with re-export modules looked
    through, and the modules' own import lists."""
    modules, reexports = {}, set()
    for name, path, is_package in _module_files():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        existing = set()
        for target in _imports(name, tree, is_package):
            existing.add(target)
        modules[name] = existing
        if not is_package and _is_reexport(tree):
            reexports.add(name)
    known = set(modules)

    def resolve(target, seen=()):
        target = target if target in known else target.rsplit(".", 1)[0]
        if target not in known:
            return set()
        if target not in reexports or target in seen:
            return {target}
        out = set()
        for t in modules[target]:
            out |= resolve(t, seen + (target,))
        return out

    graph = defaultdict(lambda: defaultdict(list))
    for name, targets in modules.items():
        if name in reexports:
            continue
        for target in targets:
            for real in resolve(target):
                if (name, real) in KNOWN_IMPORTS:
                    continue
                a, b = _part(name), _part(real)
                if a != b and b != "opacus":
                    graph[a][b].append((name, real))
    return graph, modules, reexports


def _cycles(graph):
    """The strongly connected components with more than one part (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(frozenset(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_the_parts_of_the_package():
    graph, _, _ = import_graph()
    cycles = _cycles(graph)
    details = []
    for component in cycles:
        for a in sorted(component):
            for b in sorted(component & set(graph[a])):
                details.append(f"{a} -> {b}: {graph[a][b][:3]}")
    assert not cycles, "import cycles:\n" + "\n".join(details)
    _, modules, _ = import_graph()
    stale = [m for m in ASSIGNED_ELSEWHERE if m not in modules]
    assert not stale, f"ASSIGNED_ELSEWHERE lists modules that moved, remove them: {stale}"
    gone = [(a, b) for a, b in KNOWN_IMPORTS if b not in modules.get(a, ())]
    assert not gone, f"KNOWN_IMPORTS lists imports that no longer exist, remove them: {gone}"


def test_the_cycle_finder_finds_a_deferred_import_cycle():
    """The check can fail: an import inside a function closes a cycle like any other."""
    a = ast.parse("def f():\n    from opacus.b import x\n")
    assert list(_imports("opacus.a.m", a, False)) == ["opacus.b", "opacus.b.x"]
    graph = {"opacus.a": {"opacus.b": []}, "opacus.b": {"opacus.a": []}, "opacus.c": {}}
    assert _cycles(graph) == [frozenset({"opacus.a", "opacus.b"})]
    assert _cycles({"opacus.a": {"opacus.b": []}}) == []


def test_reexport_modules_are_recognised():
    assert _is_reexport(ast.parse('"""Doc."""\nfrom x import y\n__all__ = ["y"]\n'))
    assert not _is_reexport(ast.parse("from x import y\n\ndef f():\n    pass\n"))
    _, _, reexports = import_graph()
    assert "opacus.utils.fast_gradient_clipping_utils" in reexports
    assert "opacus.utils.uniform_sampler" in reexports  # the samplers' 1.6 path


def _lines(path):
    with open(path) as f:
        return sum(1 for _ in f)


def test_utils_is_under_ten_percent_of_the_package():
    total = utils = 0
    for name, path, _ in _module_files():
        n = _lines(path)
        total += n
        if name == "opacus.utils" or name.startswith("opacus.utils."):
            utils += n
    assert utils < 0.10 * total, f"opacus/utils has {utils} of {total} lines ({utils / total:.1%})"


def test_no_privacy_breaking_code_ships_in_the_package():
    assert not os.path.exists(os.path.join(PACKAGE, "auditing", "sabotage.py"))
    with pytest.raises(ImportError):
        __import__("opacus.auditing.sabotage")
    # The tests and the auditing example share one copy, outside the package.
    from tests.auditing import sabotage

    assert os.path.dirname(sabotage._PATH) == os.path.join(ROOT, "examples")
    assert sabotage.NoClipping.__module__ == "_opacus_examples_sabotage"


def test_every_function_is_simple_enough():
    pytest.importorskip("flake8")  # a test-only dependency (requirements-dev.txt)
    proc = subprocess.run(
        [sys.executable, "-m", "flake8", "--max-complexity", "10", "--select", "C901", "opacus"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr

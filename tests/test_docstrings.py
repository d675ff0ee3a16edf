"""Every public module, class, function and method of the package has its own docstring, and
every parameter of the Opacus 1.6 interface is documented (the rule is stated below)."""

import ast
import importlib
import inspect
import logging
import os
import pkgutil
import re
import textwrap

import pytest

import opacus

OPTIONAL = {"opacus.lightning"}  # needs pytorch-lightning


def _modules():
    for info in pkgutil.walk_packages(opacus.__path__, prefix="opacus."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        try:
            yield importlib.import_module(info.name)
        except ImportError:
            if info.name not in OPTIONAL:
                raise


def _public_objects():
    yield opacus
    for module in _modules():
        yield module
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                yield obj
            elif inspect.isclass(obj):
                yield obj
                for attr, member in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(member, (classmethod, staticmethod)):
                        member = member.__func__
                    if isinstance(member, property):
                        member = member.fget
                    if inspect.isfunction(member):
                        yield member


def _name(obj):
    module = getattr(obj, "__module__", None) or ""
    return f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', obj))}"


def test_every_public_object_has_a_docstring():
    missing = sorted({_name(obj) for obj in _public_objects() if not (obj.__doc__ or "").strip()})
    assert not missing, f"{len(missing)} public objects without a docstring:\n" + "\n".join(missing)


# ---------------------------------------------------------------------------------------------
# Every parameter of the Opacus 1.6 interface is documented.
#
# The rule, for every callable that tests/reference/opacus-1.6-api.md lists as defined in a
# module (functions, classes' ``__init__`` and the methods listed under a class; properties and
# re-exports excluded), its docstring parsed as Google style by griffe (the parser the docs
# site uses):
#   * Args: one entry for every parameter except self, cls, *args and **kwargs; for
#     ``__init__`` the entries may be in the class docstring (the site merges the two);
#   * Args never names a parameter the signature does not have (a stale entry);
#   * Returns: present when the reference signature declares a return type other than None;
#   * Raises: lists every exception class that the callable's own body raises with a
#     ``raise SomeError(...)`` statement (not re-raises, not nested functions).
# ---------------------------------------------------------------------------------------------


REFERENCE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "reference", "opacus-1.6-api.md"
)


def _reference_callables():
    """``(module, qualname, returns_something)`` for every callable the reference defines."""
    entries, module, cls = [], None, None
    with open(REFERENCE, encoding="utf8") as f:
        for line in f:
            line = line.rstrip("\n")
            m = re.match(r"^## (\S+)", line)
            if m:
                module, cls = m.group(1), None
                continue
            m = re.match(r"^- class `(\w+)\(.*\)`(\*?)$", line)
            if m:
                cls = None if m.group(2) else m.group(1)
                continue
            m = re.match(r"^- def `(\w+)\(.*\)( -> (.*))?`(\*?)$", line)
            if m:
                cls = None
                if not m.group(4):
                    entries.append((module, m.group(1), _returns(m.group(3))))
                continue
            m = re.match(r"^  - `(\w+)(\(.*\))?( -> (.*?))?`( \((classmethod|property)\))?$", line)
            if m and cls and m.group(6) != "property" and m.group(2) is not None:
                entries.append((module, f"{cls}.{m.group(1)}", _returns(m.group(4))))
    return entries


def _returns(annotation):
    return bool(annotation) and annotation.strip().strip("'\"") not in ("None", "NoneType")


def _sections(doc):
    Docstring = pytest.importorskip("griffe").Docstring  # the docs' parser (mkdocstrings)

    if not doc:
        return {}
    logging.getLogger("griffe").disabled = True
    out = {}
    for section in Docstring(inspect.cleandoc(doc)).parse("google"):
        out.setdefault(section.kind.value, []).extend(
            section.value if isinstance(section.value, list) else [section.value]
        )
    return out


def _raised(func):
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return set()
    tree = ast.parse(source).body[0]
    found = set()

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            if isinstance(child, ast.Raise) and child.exc is not None:
                exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                name = getattr(exc, "id", None) or getattr(exc, "attr", None)
                if name and name[0].isupper():
                    found.add(name)
            walk(child)

    walk(tree)
    return found


def _problems(module_name, qualname, returns):
    module = importlib.import_module(module_name)
    cls_name, _, attr = qualname.rpartition(".")
    if cls_name:
        cls = getattr(module, cls_name)
        func = getattr(cls, attr)
        docs = [func.__doc__]
        if attr == "__init__":
            docs = [
                cls.__doc__,
                cls.__dict__["__init__"].__doc__ if "__init__" in cls.__dict__ else None,
            ]
            func = cls.__init__
    else:
        func = getattr(module, qualname)
        docs = [func.__doc__]
    sections = {}
    for doc in docs:
        for kind, items in _sections(doc).items():
            sections.setdefault(kind, []).extend(items)
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    params = [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    documented = [p.name for p in sections.get("parameters", [])]
    problems = [f"Args: {p}" for p in params if p not in documented]
    all_names = set(signature.parameters) - {"self", "cls"}
    problems += [
        f"stale Args entry: {d}"
        for d in documented
        if d.lstrip("*") not in all_names and not d.startswith("*")
    ]
    if returns and attr != "__init__" and not sections.get("returns"):
        problems.append("Returns")
    listed = {str(r.annotation).split(".")[-1] for r in sections.get("raises", [])}
    problems += [f"Raises: {e}" for e in sorted(_raised(func) - listed)]
    return problems


CALLABLES = _reference_callables()


def test_reference_callables_were_parsed():
    assert len(CALLABLES) > 250
    assert ("opacus.privacy_engine", "PrivacyEngine.make_private", True) in CALLABLES


def test_rule_catches_an_undocumented_parameter():
    def documented(a, b, *args, **kwargs):
        """Summary.

        Args:
            a: the first.
            c: no such parameter.

        Raises:
            ValueError: never.
        """
        raise TypeError("x")

    sections = _sections(documented.__doc__)
    assert [p.name for p in sections["parameters"]] == ["a", "c"]
    assert _raised(documented) == {"TypeError"}


def test_every_public_parameter_is_documented():
    report = {}
    for module_name, qualname, returns in CALLABLES:
        try:
            problems = _problems(module_name, qualname, returns)
        except ImportError:
            if module_name in OPTIONAL:
                continue
            raise
        if problems:
            report[f"{module_name}:{qualname}"] = problems
    known = KNOWN_GAPS
    new = {k: [p for p in v if p not in known.get(k, ())] for k, v in report.items()}
    new = {k: v for k, v in new.items() if v}
    fixed = {k: [p for p in v if p not in report.get(k, ())] for k, v in known.items()}
    fixed = {k: v for k, v in fixed.items() if v}
    assert not new, "undocumented (see the rule above):\n" + "\n".join(
        f"{k}: {', '.join(v)}" for k, v in sorted(new.items())
    )
    assert not fixed, f"documented now, remove from {GAPS_FILE}:\n" + "\n".join(
        f"{k}: {v}" for k, v in sorted(fixed.items())
    )


# Gaps still open, one "module:qualname<TAB>problem" per line. The file only shrinks: a gap
# that gets documented must be removed from it (the test says so).
GAPS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docstring_gaps.txt")


def _known_gaps():
    gaps = {}
    if os.path.exists(GAPS_FILE):
        with open(GAPS_FILE, encoding="utf8") as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    key, problem = line.rstrip("\n").split("\t")
                    gaps.setdefault(key, []).append(problem)
    return gaps


KNOWN_GAPS = _known_gaps()

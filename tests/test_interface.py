"""Walks the Opacus 1.6 interface reference and checks that every module, class, function and
method it lists exists here with the same parameter names, kinds and simple defaults (drop-in
compatibility)."""

import ast
import importlib
import inspect
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A copy of the interface reference lives in the repository so that this test runs (and can fail)
# on any clean clone; test_reference_copy_is_current checks it against the shared original.
REFERENCE = os.path.join(ROOT, "tests", "reference", "opacus-1.6-api.md")
SHARED_REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference", "opacus-1.6-api.md")

# Modules of the reference that need an optional extra; they are checked only when it is installed.
OPTIONAL = {"opacus.lightning": "pytorch_lightning"}


def _split_top_level(text):
    parts, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            current += ch
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def _params_of(signature_text):
    """[(name, kind, default-or-None)] from the reference's rendering of a signature."""
    inner = signature_text[signature_text.index("(") + 1 :]
    depth = 1
    for i, ch in enumerate(inner):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            inner = inner[:i]
            break
    params, keyword_only = [], False
    for part in _split_top_level(inner):
        if part == "*":
            keyword_only = True
            continue
        if part == "/":
            continue
        if part.startswith("**"):
            params.append((part[2:].split(":")[0].strip(), "VAR_KEYWORD", None))
            continue
        if part.startswith("*"):
            params.append((part[1:].split(":")[0].strip(), "VAR_POSITIONAL", None))
            keyword_only = True
            continue
        name = re.split(r"[:=]", part, maxsplit=1)[0].strip()
        default = None
        if "=" in part:
            default = part.rsplit("=", 1)[1].strip()
        params.append((name, "KEYWORD_ONLY" if keyword_only else "POSITIONAL_OR_KEYWORD", default))
    return params


def _parse_reference():
    entries = []
    module = None
    current_class = None
    with open(REFERENCE) as f:
        for line in f:
            line = line.rstrip("\n")
            m = re.match(r"^## (\S+)", line)
            if m:
                module, current_class = m.group(1), None
                continue
            m = re.match(r"^- class `(\w+)\((.*)\)`(\*?)", line)
            if m and module:
                current_class = None if m.group(3) else m.group(1)
                entries.append((module, "class", m.group(1), None, bool(m.group(3))))
                continue
            m = re.match(r"^- def `(\w+)(\(.*\))(?: -> .*)?`(\*?)", line)
            if m and module:
                current_class = None
                entries.append((module, "def", m.group(1), m.group(2), bool(m.group(3))))
                continue
            m = re.match(r"^  - `(\w+)(\(.*\))?.*`(?: \((classmethod|property)\))?", line)
            if m and module and current_class:
                entries.append(
                    (module, "method", f"{current_class}.{m.group(1)}", m.group(2), False)
                )
    return entries


ENTRIES = _parse_reference()


def _literal(text):
    try:
        return ast.literal_eval(text)
    except Exception:
        return inspect.Parameter.empty


def _check_signature(obj, reference_sig, where):
    if reference_sig is None:
        return
    try:
        ours = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    expected = _params_of(reference_sig)
    got = [(p.name, p.kind.name, p.default) for p in ours.parameters.values()]
    # bound methods drop self/cls
    if expected and expected[0][0] in ("self", "cls") and (not got or got[0][0] != expected[0][0]):
        expected = expected[1:]
    # A superset stays drop-in compatible: extra parameters may follow the reference's ones
    # (before any **kwargs) as long as they have defaults.
    names = [g[0] for g in got]
    extra = [g for g in got if g[0] not in {e[0] for e in expected}]
    for name, kind, default in extra:
        assert (
            kind == "VAR_KEYWORD" or default is not inspect.Parameter.empty
        ), f"{where}: extra parameter {name} has no default"
    got = [g for g in got if g not in extra]
    trailing = [n for n in names if n not in {g[0] for g in got}]
    reference_tail = [g[0] for g in got if g[1] != "VAR_KEYWORD"]
    if reference_tail and trailing:
        last = names.index(reference_tail[-1])
        assert all(
            names.index(n) > last for n in trailing if n in names and n != "kwargs"
        ), f"{where}: extra parameters {trailing} must come after the reference's {reference_tail}"
    assert [e[0] for e in expected] == [g[0] for g in got], f"{where}: params {names} != {expected}"
    for (name, kind, default), (_, got_kind, got_default) in zip(expected, got):
        assert kind == got_kind, f"{where}: {name} is {got_kind}, reference {kind}"
        if default is not None:
            lit = _literal(default)
            if lit is not inspect.Parameter.empty and not isinstance(lit, (list, dict)):
                assert (
                    got_default is not inspect.Parameter.empty
                ), f"{where}: {name} lost its default"
                if isinstance(lit, float) or isinstance(got_default, float):
                    assert got_default == pytest.approx(lit), f"{where}: default of {name}"
                else:
                    assert (
                        got_default == lit
                    ), f"{where}: default of {name} {got_default!r} != {lit!r}"


@pytest.mark.parametrize(
    "module,kind,name,sig,reexport",
    ENTRIES,
    ids=[f"{e[0]}:{e[2]}" for e in ENTRIES],
)
def test_interface_entry(module, kind, name, sig, reexport):
    if module in OPTIONAL:
        pytest.importorskip(OPTIONAL[module])
    mod = importlib.import_module(module)
    if kind == "method":
        cls_name, attr = name.split(".")
        cls = getattr(mod, cls_name)
        assert hasattr(cls, attr), f"{module}.{cls_name} has no {attr}"
        raw = inspect.getattr_static(cls, attr)
        if isinstance(raw, property):
            return
        _check_signature(getattr(cls, attr), sig, f"{module}.{name}")
        return
    assert hasattr(mod, name), f"{module} has no {name}"
    if not reexport:
        _check_signature(getattr(mod, name), sig, f"{module}.{name}")


def test_reference_was_parsed():
    assert len(ENTRIES) > 300


def test_reference_copy_is_current():
    if not os.path.exists(SHARED_REFERENCE):
        pytest.skip("no shared/ folder beside this checkout to compare the copy with")
    with open(REFERENCE) as ours, open(SHARED_REFERENCE) as shared:
        assert ours.read() == shared.read(), "tests/reference is stale: copy shared/reference again"

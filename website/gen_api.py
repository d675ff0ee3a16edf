#!/usr/bin/env python
"""Writes the API reference: one Markdown page per module of the ``opacus`` package.

Walks the package with ``pkgutil``/``importlib`` and ``inspect`` and renders every module's
docstring, classes (constructor signature, docstring, public methods and properties) and
functions, plus the names it re-exports, linked to the module that defines them. No plugin is
involved: ``python website/gen_api.py --out DIR`` writes the pages to a folder, and the MkDocs
hook ``hooks.py`` calls ``generate_pages`` to add them to the site at build time, so they are
always those of the code being built.
"""

import argparse
import importlib
import inspect
import os
import pkgutil
import re
import sys
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "opacus"
API_DIR = "api"


def iter_module_names(package: str = PACKAGE) -> Tuple[List[str], Dict[str, str]]:
    """All importable public modules of ``package`` (sorted) and ``{name: error}`` for the rest.

    A module is private when any part of its dotted name starts with ``_``.
    """
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    root = importlib.import_module(package)
    names, failed = [package], {}
    for info in pkgutil.walk_packages(root.__path__, prefix=package + ".", onerror=lambda n: None):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # an optional dependency missing: say so, don't stop the site
            failed[info.name] = f"{type(exc).__name__}: {exc}"
            continue
        names.append(info.name)
    return sorted(names), failed


def page_name(module_name: str) -> str:
    return f"{module_name}.md"


def docstring_markdown(obj) -> str:
    """The docstring as Markdown: reST ``literals`` become `code`, ``Example::`` keeps its block."""
    doc = inspect.getdoc(obj) or ""
    doc = re.sub(r"``([^`]+)``", r"`\1`", doc)
    doc = re.sub(r"::\n", ":\n", doc)
    return doc.strip()


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _defined_here(obj, module) -> bool:
    return getattr(obj, "__module__", None) == module.__name__


def _public_members(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    members = []
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            members.append((name, obj))
    return members


def _class_section(name: str, cls) -> List[str]:
    bases = ", ".join(b.__name__ for b in cls.__bases__ if b is not object)
    lines = [f"### class `{name}`" + (f" ({bases})" if bases else ""), ""]
    lines += ["```python", f"{name}{_signature(cls)}", "```", ""]
    doc = docstring_markdown(cls)
    if doc:
        lines += [doc, ""]
    for attr, value in sorted(vars(cls).items()):
        if attr.startswith("_"):
            continue
        if isinstance(value, property):
            lines.append(f"- **`{attr}`** (property)" + _first_paragraph(value, " — "))
        elif isinstance(value, (classmethod, staticmethod)):
            kind = "classmethod" if isinstance(value, classmethod) else "staticmethod"
            func = value.__func__
            lines.append(
                f"- **`{attr}{_signature(func)}`** ({kind})" + _first_paragraph(func, " — ")
            )
        elif inspect.isfunction(value):
            lines.append(f"- **`{attr}{_signature(value)}`**" + _first_paragraph(value, " — "))
    lines.append("")
    return lines


def _first_paragraph(obj, prefix: str) -> str:
    doc = docstring_markdown(obj)
    if not doc:
        return ""
    return prefix + " ".join(doc.split("\n\n")[0].split())


def module_page(module_name: str, module_names: List[str]) -> str:
    """The Markdown page of one module."""
    module = importlib.import_module(module_name)
    lines = [f"# `{module_name}`", ""]
    doc = docstring_markdown(module)
    lines += [doc or "*(no module docstring)*", ""]
    children = [
        m
        for m in module_names
        if m.startswith(module_name + ".") and "." not in m[len(module_name) + 1 :]
    ]
    if children:
        lines += ["**Submodules:** " + ", ".join(f"[`{c}`]({page_name(c)})" for c in children), ""]
    members = _public_members(module)
    classes = [(n, o) for n, o in members if inspect.isclass(o) and _defined_here(o, module)]
    functions = [(n, o) for n, o in members if inspect.isfunction(o) and _defined_here(o, module)]
    reexports = [
        (n, o)
        for n, o in members
        if not _defined_here(o, module)
        and str(getattr(o, "__module__", "")).startswith(PACKAGE + ".")
    ]
    if classes:
        lines += ["## Classes", ""]
        for name, cls in classes:
            lines += _class_section(name, cls)
    if functions:
        lines += ["## Functions", ""]
        for name, func in functions:
            lines += [f"### `{name}`", "", "```python", f"{name}{_signature(func)}", "```", ""]
            doc = docstring_markdown(func)
            if doc:
                lines += [doc, ""]
    if reexports:
        lines += ["## Also available here", ""]
        for name, obj in reexports:
            home = obj.__module__
            target = f"[`{home}`]({page_name(home)})" if home in module_names else f"`{home}`"
            lines.append(f"- `{name}` (defined in {target})")
        lines.append("")
    return "\n".join(lines)


def index_page(module_names: List[str], failed: Dict[str, str]) -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `website/gen_api.py`: one page per public module. The",
        "module paths, class names and call signatures are those of Opacus 1.6.",
        "",
    ]
    for name in module_names:
        summary = _first_paragraph(importlib.import_module(name), "")
        lines.append(f"- [`{name}`]({page_name(name)})" + (f" — {summary}" if summary else ""))
    if failed:
        lines += ["", "Not importable where this site was built (optional dependencies):", ""]
        lines += [f"- `{name}`: {error}" for name, error in sorted(failed.items())]
    lines.append("")
    return "\n".join(lines)


def generate_pages(package: str = PACKAGE) -> Dict[str, str]:
    """``{path relative to the docs folder: Markdown}`` for the index and every module."""
    names, failed = iter_module_names(package)
    pages = {f"{API_DIR}/index.md": index_page(names, failed)}
    for name in names:
        pages[f"{API_DIR}/{page_name(name)}"] = module_page(name, names)
    return pages


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        default=os.path.join(ROOT, "website", "build", "api-md"),
        help="folder to write the pages into (an api/ subfolder is made)",
    )
    args = p.parse_args(argv)
    pages = generate_pages()
    for rel, text in pages.items():
        path = os.path.join(args.out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf8") as f:
            f.write(text)
    print(f"wrote {len(pages)} pages under {os.path.join(args.out, API_DIR)}")


if __name__ == "__main__":
    main()

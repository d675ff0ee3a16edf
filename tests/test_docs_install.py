"""The install story is true: setup.py and the installation page name the same torch minimum,
the package imports nothing at module level that needs a newer torch, and the docs say how to
keep one's own torch build and carry no machine-specific paths."""

import ast
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "website", "docs")

# torch APIs newer than 2.0 that the package uses, with the release that introduced them. A
# module-level import of one of them raises the real minimum to that release; inside a function
# or under a guard (try/except, hasattr) it only limits the feature that uses it.
TORCH_API_SINCE = {
    "torch.autograd.graph.GradientEdge": (2, 2),
    "torch.autograd.graph.get_gradient_edge": (2, 2),
    "torch.nn.RMSNorm": (2, 4),
    "torch.distributed.tensor.DTensor": (2, 4),
    "torch.distributed.tensor": (2, 4),
    "torch.distributed.fsdp.fully_shard": (2, 6),
}


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf8") as f:
        return f.read()


def _version(text):
    return tuple(int(p) for p in text.split("."))


def _setup_minimum():
    match = re.search(r'"torch>=([0-9.]+)"', _read("setup.py"))
    assert match, "setup.py must declare torch>=X.Y in install_requires"
    return _version(match.group(1))


def _module_level_torch_imports():
    """``(file, dotted name)`` of every torch import at module level, outside try blocks."""
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "opacus")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf8") as f:
                tree = ast.parse(f.read())
            for node in tree.body:  # module level only: not in functions, classes or try
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
                    found += [(path, f"{node.module}.{alias.name}") for alias in node.names]
                    found.append((path, node.module))
                elif isinstance(node, ast.Import):
                    found += [(path, a.name) for a in node.names if a.name.startswith("torch")]
    return found


def test_setup_and_installation_page_name_the_same_torch_minimum():
    minimum = _setup_minimum()
    page = _read("website", "docs", "installation.md")
    stated = re.search(r"\*\*PyTorch ([0-9.]+)\*\* or newer", page)
    assert stated, "installation.md must state 'PyTorch X.Y or newer'"
    assert _version(stated.group(1)) == minimum
    assert f"torch>={'.'.join(map(str, minimum))}" in page
    installed = _version(re.match(r"[0-9]+\.[0-9]+", torch.__version__).group(0))
    assert installed >= minimum
    python = re.search(r'python_requires=">=([0-9.]+)"', _read("setup.py")).group(1)
    assert f"**Python {python}** or newer" in page


def test_no_module_level_import_needs_a_newer_torch_than_the_minimum():
    minimum = _setup_minimum()
    imports = _module_level_torch_imports()
    assert any(name == "torch.nn" for _, name in imports)  # the scan sees the imports
    too_new = [
        (os.path.relpath(path, ROOT), name, since)
        for path, name in imports
        for api, since in TORCH_API_SINCE.items()
        if name == api and since > minimum
    ]
    assert not too_new, f"module-level imports newer than torch {minimum}: {too_new}"
    # The minimum is not lower than what a module-level import really needs.
    needed = max(
        [since for _, name in imports for api, since in TORCH_API_SINCE.items() if name == api],
        default=(2, 0),
    )
    assert minimum == max(needed, (2, 0)), (minimum, needed)


def test_installation_page_lists_every_version_gated_feature():
    page = _read("website", "docs", "installation.md")
    table = {row.split("|")[1].strip(): row for row in page.splitlines() if row.startswith("| ")}
    for version in {since for since in TORCH_API_SINCE.values()}:
        key = ".".join(map(str, version))
        assert key in table or f"**{key}**" in table, f"no row for torch {key}"


def test_docs_say_how_to_keep_an_own_torch_build():
    page = _read("website", "docs", "installation.md")
    assert "--no-deps" in page and "-c constraints.txt" in page
    assert "download.pytorch.org/whl/cpu" in page
    quickstart = _read("website", "docs", "quickstart.md")
    assert "installation.md#keep-your-own-pytorch" in quickstart
    # what each README command does and how long it takes
    assert re.search(r"about 90 s on 2 CPU cores", quickstart)


def test_no_machine_specific_paths_in_install_files():
    for parts in (
        ("setup.py",),
        ("requirements-dev.txt",),
        ("website", "requirements.txt"),
        ("website", "mkdocs.yml"),
        ("website", "docs", "installation.md"),
        ("website", "docs", "quickstart.md"),
    ):
        text = _read(*parts)
        assert "--find-links" not in text and "file://" not in text, parts
        assert not re.search(r"(?<![\w.])/(work|home|root|tmp|Users)/", text), parts

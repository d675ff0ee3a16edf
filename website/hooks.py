"""MkDocs hooks: the API reference pages, the changelog, the tutorial notebooks and the version.

* the API pages come from ``api_pages.py`` (one ``::: module`` block per public module, rendered
  by mkdocstrings), produced in memory at build time so they are never stale nor committed;
* the changelog page is the repository's ``CHANGELOG.md`` itself;
* the notebooks of ``tutorials/`` are added before mkdocs-jupyter renders them, so the site
  shows the committed notebooks (with their outputs and plots) and offers them for download;
* the footer shows the package version.
"""

import glob
import os
import sys

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import api_pages  # noqa: E402 (the page list sits next to this hook)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANGELOG = os.path.join(ROOT, "CHANGELOG.md")
TUTORIALS = os.path.join(ROOT, "tutorials")

_pages = {}


def _version():
    scope = {}
    with open(os.path.join(ROOT, "opacus", "version.py"), encoding="utf8") as f:
        exec(f.read(), scope)
    return scope["__version__"]


def notebooks():
    """The tutorial notebooks, as paths relative to the repository (``tutorials/x.ipynb``)."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(TUTORIALS, "*.ipynb")))


def _title(notebook):
    import json

    with open(os.path.join(ROOT, notebook), encoding="utf8") as f:
        cells = json.load(f).get("cells", [])
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            text = "".join(cell.get("source", []))
            for line in text.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return os.path.splitext(os.path.basename(notebook))[0].replace("_", " ").capitalize()


def on_config(config):
    _pages.clear()
    _pages.update(api_pages.generate_pages())
    version = _version()
    config["copyright"] = f"opacus {version} &middot; Opacus 1.6 interface &middot; Apache-2.0"
    config["extra"]["version_string"] = version
    for i, item in enumerate(config["nav"]):
        if not isinstance(item, dict):
            continue
        if "API reference" in item:
            config["nav"][i] = {"API reference": api_pages.nav_section(_pages)}
        if "Getting started" in item:
            section = item["Getting started"]
            for j, entry in enumerate(section):
                if isinstance(entry, dict) and entry.get("Tutorials") == "tutorials.md":
                    tutorials = [{"Overview": "tutorials.md"}]
                    tutorials += [{_title(nb): nb} for nb in notebooks()]
                    section[j] = {"Tutorials": tutorials}
    return config


@event_priority(100)  # before mkdocs-jupyter turns the notebooks into pages
def on_files(files, config):
    for rel, text in _pages.items():
        files.append(File.generated(config, rel, content=text))
    # The changelog page is the repository's CHANGELOG.md itself, so the two cannot drift apart.
    with open(CHANGELOG, encoding="utf8") as f:
        files.append(File.generated(config, "changelog.md", content=f.read()))
    for notebook in notebooks():
        files.append(
            File(
                notebook,
                src_dir=ROOT,
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files

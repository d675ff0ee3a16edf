"""The pages of the API reference: one per public module, rendered by mkdocstrings.

This file only decides *which* pages exist and where they sit in the navigation; the content
(signatures, Google-style ``Args``/``Returns``/``Raises`` sections, one anchor per member) is
rendered from the docstrings by the mkdocstrings Python handler at build time.
``python website/api_pages.py --out DIR`` writes the page sources to a folder, and the MkDocs
hook ``hooks.py`` adds them to the site in memory, so they are never stale and never committed.
"""

import argparse
import importlib
import os
import pkgutil
import re
import sys
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "opacus"
API_DIR = "api"

# Modules that are not part of the Opacus 1.6 interface: built and searchable, but kept out of
# the navigation and ranked below the public API in search.
INTERNAL = {
    "opacus.version": "the package version",
    "opacus.grad_sample.batch_gradients": "internal: the batch-gradient pass",
    "opacus.grad_sample.buffers": "internal: per-pass buffers of the hooks",
    "opacus.grad_sample.call_capture": "internal: the captured calls awaiting their gradient",
    "opacus.grad_sample.modes": "internal: the table of grad_sample modes",
    "opacus.grad_sample.registry": "internal: the per-layer function registry",
    "opacus.grad_sample.safety_checks": "internal: checks run by the hooks",
    "opacus.optimizers.clipping": "internal: per-sample norms, clip factors, clipped sums",
    "opacus.optimizers.consumed": "internal: release-once marks of the gradients",
    "opacus.optimizers.families": "internal: the optimizer family of each grad_sample mode",
    "opacus.optimizers.noise": "internal: Gaussian noise of the mechanism",
    "opacus.optimizers.reduction": "internal: the cross-process reduction of the sums",
    "opacus.grad_sample.module_utils": "internal: walking and copying module trees",
    "opacus.grad_sample.pass_state": "internal: per-backward-pass state of the hooks",
    "opacus.grad_sample.tensor_utils": "internal: tensor helpers of the samplers",
    "opacus.validators.rnn": "internal: shared RNN validation",
}
# Rendered in full on the Core API page (api/core.md); their modules' pages link there, so every
# object has exactly one anchor on the site.
CORE = {
    "opacus.privacy_engine": ["PrivacyEngine"],
    "opacus.grad_sample.grad_sample_module": ["GradSampleModule"],
    "opacus.grad_sample.grad_sample_module_fast_gradient_clipping": [
        "GradSampleModuleFastGradientClipping"
    ],
    "opacus.optimizers.optimizer": ["DPOptimizer"],
    "opacus.optimizers.optimizer_fast_gradient_clipping": ["DPOptimizerFastGradientClipping"],
    "opacus.optimizers.perlayeroptimizer": ["DPPerLayerOptimizer"],
    "opacus.optimizers.ddpoptimizer": ["DistributedDPOptimizer"],
    "opacus.optimizers.adaclipoptimizer": ["AdaClipDPOptimizer"],
    "opacus.accountants.rdp": ["RDPAccountant"],
    "opacus.accountants.prv": ["PRVAccountant"],
    "opacus.accountants.gdp": ["GaussianAccountant"],
    "opacus.accountants.utils": ["get_noise_multiplier"],
    "opacus.data_loader": ["DPDataLoader"],
    "opacus.utils.batch_memory_manager": ["BatchMemoryManager"],
    "opacus.layers.dp_multihead_attention": ["DPMultiheadAttention"],
    "opacus.layers.dp_rnn": ["DPLSTM", "DPGRU", "DPRNN"],
    "opacus.validators.module_validator": ["ModuleValidator"],
}
# Search weights (Material for MkDocs' per-page ``search.boost``).
BOOST_CORE, BOOST_PUBLIC, BOOST_INTERNAL = 3, 1, 0.1


def iter_module_names(package: str = PACKAGE) -> Tuple[List[str], Dict[str, str]]:
    """All importable public modules of ``package`` and ``{name: error}`` for the others.

    Args:
        package: the import name of the package to walk.

    Returns:
        The sorted module names (the package included) and the import errors of the modules
        that could not be imported (an optional dependency missing), by module name. A module
        is private when any part of its dotted name starts with ``_``.
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


def page_path(module_name: str) -> str:
    """The page of a module, relative to the docs folder (``api/opacus.data_loader.md``)."""
    return f"{API_DIR}/{module_name}.md"


def _summary(module_name: str) -> str:
    doc = importlib.import_module(module_name).__doc__ or ""
    first = doc.strip().split("\n\n")[0]
    first = re.sub(r"``([^`]+)``", r"`\1`", " ".join(first.split()))
    return first


def module_page(module_name: str) -> str:
    """The Markdown source of a module's page: front matter and one mkdocstrings block."""
    boost = BOOST_INTERNAL if module_name in INTERNAL else BOOST_PUBLIC
    lines = ["---", "search:", f"  boost: {boost}", "---", "", f"# `{module_name}`", ""]
    if module_name in INTERNAL:
        lines += [
            '!!! note "Not part of the public interface"',
            f"    {INTERNAL[module_name].capitalize()}. It may change without notice.",
            "",
        ]
    core = CORE.get(module_name, [])
    if core:
        links = ", ".join(f"[`{name}`](core.md#{module_name}.{name})" for name in core)
        lines += [f"Documented on the Core API page: {links}.", ""]
    lines += [f"::: {module_name}", "    options:", "      show_root_heading: false"]
    if core:
        lines.append("      filters:")
        lines += [f'        - "{pattern}"' for pattern in ["!^_"] + [f"!^{n}$" for n in core]]
    lines.append("")
    return "\n".join(lines)


def index_page(module_names: List[str], failed: Dict[str, str]) -> str:
    """The overview: the Core API page first, then every public module with its summary."""
    lines = [
        "# API reference",
        "",
        "Start with the [Core API](core.md): the classes and functions a training script uses.",
        "Below, one page per public module, generated from the docstrings by",
        "[mkdocstrings](https://mkdocstrings.github.io/). Module paths, class names and call",
        "signatures are those of Opacus 1.6.",
        "",
    ]
    for name in module_names:
        if name in INTERNAL:
            continue
        summary = _summary(name)
        lines.append(f"- [`{name}`]({name}.md)" + (f": {summary}" if summary else ""))
    lines += ["", "## Internals", "", "Not part of the interface; documented for contributors.", ""]
    for name in module_names:
        if name in INTERNAL:
            lines.append(f"- [`{name}`]({name}.md): {INTERNAL[name]}")
    if failed:
        lines += ["", "Not importable where this site was built (optional dependencies):", ""]
        lines += [f"- `{name}`: {error}" for name, error in sorted(failed.items())]
    lines.append("")
    return "\n".join(lines)


def generate_pages(package: str = PACKAGE) -> Dict[str, str]:
    """``{path relative to the docs folder: Markdown}`` for the overview and every module."""
    names, failed = iter_module_names(package)
    pages = {f"{API_DIR}/index.md": index_page(names, failed)}
    for name in names:
        pages[page_path(name)] = module_page(name)
    return pages


def nav_section(pages: Dict[str, str]) -> list:
    """The "API reference" navigation: overview, Core API, then public modules by package."""
    groups: Dict[str, list] = {}
    for rel in pages:
        if rel == f"{API_DIR}/index.md":
            continue
        module = rel[len(API_DIR) + 1 : -len(".md")]
        if module in INTERNAL:
            continue
        parts = module.split(".")
        group = ".".join(parts[:2]) if len(parts) > 1 else parts[0]
        # short labels under the package's heading: "analysis.prv.compose", not the full path
        label = module[len(group) + 1 :] if module != group else group
        groups.setdefault(group, []).append({label: rel})
    section = [{"Overview": f"{API_DIR}/index.md"}, {"Core API": f"{API_DIR}/core.md"}]
    section += [{name: entries} for name, entries in sorted(groups.items())]
    return section


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        default=os.path.join(ROOT, "website", "build", "api-md"),
        help="folder to write the page sources into (an api/ subfolder is made)",
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

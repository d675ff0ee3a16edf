"""The tutorial notebooks: committed with outputs, in sync with their sources, and they run.

Executed with nbclient in fast mode (``OPACUS_TUTORIAL_FAST=1``); the checks read numbers the
notebooks print and compare them with what they must be (a brute-force per-example loop, the
``nn.MultiheadAttention`` outputs, ``dp_accounting``).
"""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = os.path.join(ROOT, "tutorials")
NAMES = [
    "building_image_classifier.ipynb",
    "building_text_classifier.ipynb",
    "guide_to_privacy_accounting.ipynb",
]


def _builder():
    path = os.path.join(TUTORIALS, "build_notebooks.py")
    spec = importlib.util.spec_from_file_location("build_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text_outputs(nb):
    chunks = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{out.get('ename')}: {out.get('evalue')}"
            chunks.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "".join(chunks)


def _plots(nb):
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_outputs_and_matches_its_source(name):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(os.path.join(TUTORIALS, name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "store the notebook executed"
    assert all(c.get("outputs") for c in code), "a code cell without output"
    assert "full mode" in _text_outputs(nb), "commit the outputs of a full (not fast) run"
    assert _plots(nb) >= 1, "every tutorial shows at least one plot"
    sources = [source for _, source in _builder().NOTEBOOKS[name]]
    assert [c.source for c in nb.cells] == sources, (
        "the notebook differs from tutorials/build_notebooks.py: rebuild it with "
        "`python tutorials/build_notebooks.py`"
    )


@pytest.fixture(scope="module")
def executed():
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    cache = {}

    def run(name):
        if name not in cache:
            nb = nbformat.read(os.path.join(TUTORIALS, name), as_version=4)
            for cell in nb.cells:
                if cell.cell_type == "code":
                    cell.outputs = []
            old = os.environ.get("OPACUS_TUTORIAL_FAST")
            os.environ["OPACUS_TUTORIAL_FAST"] = "1"  # the kernel inherits the environment
            try:
                NotebookClient(
                    nb,
                    timeout=300,
                    kernel_name="python3",
                    resources={"metadata": {"path": TUTORIALS}},
                ).execute()
            finally:
                if old is None:
                    del os.environ["OPACUS_TUTORIAL_FAST"]
                else:
                    os.environ["OPACUS_TUTORIAL_FAST"] = old
            assert _plots(nb) >= 1, f"{name}: no plot in fast mode"
            cache[name] = _text_outputs(nb)
        return cache[name]

    return run


@pytest.mark.slow
def test_image_classifier_notebook(executed):
    text = executed("building_image_classifier.ipynb")
    assert "fast mode" in text
    assert "valid now: True" in text and "GroupNorm" in text
    eps = float(re.search(r"target eps 2\.0 -> spent ([0-9.]+)", text).group(1))
    assert eps <= 2.0 + 1e-6
    dp_acc = float(re.search(r"DP-SGD: ([0-9.]+) at eps", text).group(1))
    assert dp_acc > 0.2  # 10 classes, two epochs


@pytest.mark.slow
def test_text_classifier_notebook(executed):
    text = executed("building_text_classifier.ipynb")
    diffs = [float(d) for d in re.findall(r"max \|difference\| ([0-9.e+-]+)", text)]
    assert len(diffs) == 2 and max(diffs) < 1e-5  # equals nn.MultiheadAttention, both layouts
    loop = float(re.search(r"per-example loop: ([0-9.e+-]+)", text).group(1))
    assert loop < 1e-5  # per-sample gradients equal the one-at-a-time loop
    assert "'_module.head.weight': (3, 2, 16)" in text  # seq-first: batch 3 on dim 0
    count, share = re.search(
        r"(\d+) per-example norms, median [0-9.]+; (\d+)% are clipped", text
    ).groups()
    assert int(count) > 0 and 0 <= int(share) <= 100


@pytest.mark.slow
def test_accounting_notebook(executed):
    text = executed("guide_to_privacy_accounting.ipynb")
    pairs = re.findall(r"PRV ([0-9.]+), dp_accounting PLD ([0-9.]+)", text)
    if importlib.util.find_spec("dp_accounting") is not None:
        assert len(pairs) == 2
    for prv, pld in pairs:
        assert float(prv) == pytest.approx(float(pld), rel=0.02)
    for target, got in re.findall(r"target eps ([0-9.]+) .*\(check: eps ([0-9.]+)\)", text):
        assert float(got) <= float(target) + 1e-9
        assert float(got) >= float(target) - 0.02

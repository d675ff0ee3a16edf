"""tutorials/finetune_lm.ipynb: committed executed (full mode), and it runs (fast mode)."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUTORIALS = os.path.join(ROOT, "tutorials")
NAME = "finetune_lm.ipynb"


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


def _pld_epsilon(sigma, sample_rate, steps, delta):
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


def _check(text, steps):
    assert "frozen parameters carrying grad_sample: 0" in text
    assert "model class kept: PeftModel" in text
    assert "ValueError: DPTrainer: TrainingArguments.max_grad_norm=1.0" in text
    q, privacy_steps, trainer_steps, eps = re.search(
        r"sample rate q = ([0-9.]+), (\d+) privacy steps for (\d+) Trainer steps; "
        r"final epsilon ([0-9.]+)",
        text,
    ).groups()
    assert int(privacy_steps) == int(trainer_steps) == steps
    assert float(eps) == pytest.approx(_pld_epsilon(0.8, float(q), steps, 1e-5), rel=0.03)
    users, rate, user_eps = re.search(
        r"(\d+) users; user sample rate ([0-9.]+); user-level epsilon ([0-9.]+)", text
    ).groups()
    assert float(rate) == pytest.approx(8 / int(users), abs=1e-4)
    assert float(user_eps) == pytest.approx(
        _pld_epsilon(1.5, 8 / int(users), steps, 1e-5), rel=0.03
    )


@pytest.mark.slow  # the dp_accounting PLD oracle takes a few seconds
def test_committed_notebook_is_executed_in_full_mode():
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("transformers")
    nb = nbformat.read(os.path.join(TUTORIALS, NAME), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "store the notebook executed"
    assert all(c.get("outputs") for c in code), "a code cell without output"
    text = _text_outputs(nb)
    assert "full mode" in text
    assert _plots(nb) >= 1
    _check(text, steps=60)


@pytest.mark.slow
def test_notebook_runs_in_fast_mode(monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("ipykernel")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(TUTORIALS, NAME), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    monkeypatch.setenv("OPACUS_TUTORIAL_FAST", "1")  # the kernel inherits the environment
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": TUTORIALS}}
    ).execute()
    text = _text_outputs(nb)
    assert "fast mode" in text and _plots(nb) >= 1
    _check(text, steps=6)

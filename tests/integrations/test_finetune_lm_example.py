"""examples/finetune_lm.py in quick mode, as a user runs it (a subprocess)."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "finetune_lm.py")


def _number(text, key):
    match = re.search(re.escape(key) + r"\s+([-+0-9.e]+)", text)
    assert match, f"{key!r} not in {text!r}"
    return float(match.group(1))


def _pld_epsilon(sigma, sample_rate, steps, delta):
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


@pytest.mark.slow
def test_finetune_lm_quick_reports_loss_and_the_right_epsilon():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--no-progress", "--threads", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT: ")]
    assert lines, proc.stdout
    result = lines[-1]
    assert _number(result, "steps") == 4
    loss = _number(result, "loss")
    assert 0 < loss < 10
    printed = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(printed) == 2 and "epsilon" in printed[0]
    # Quick mode: windows of 32 characters every 8 of the shipped text; 8 x 2 expected per step.
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import finetune_lm

    args = finetune_lm.parse_args(["--quick"])
    text = open(args.text, encoding="utf8").read()
    n = len(finetune_lm.windows(finetune_lm.CharTokenizer(text).encode(text), 32, 8))
    expected = _pld_epsilon(args.sigma, 16 / n, 4, args.delta)
    assert _number(result, "epsilon") == pytest.approx(expected, rel=0.03)

"""The auditing example end to end, with tiny settings: a correct run is consistent with its claim,
a run with clipping switched off is caught."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--trials", "200", "--canaries-per-run", "20", "--num-canaries", "200"]


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "audit_dp_sgd.py"), *SMALL, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")][-1]


@pytest.mark.slow
def test_correct_run_is_consistent_and_sabotage_is_caught():
    assert "consistent with the claim" in _run()
    assert "VIOLATION" in _run("--sabotage", "no-clip")

"""Lint as part of the suite: flake8 over everything Python in the repository (setup.cfg)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINTED = ["opacus", "tests", "examples", "benchmarks", "tutorials", "website", "setup.py"]


def test_flake8_clean():
    pytest.importorskip("flake8")
    result = subprocess.run(
        [sys.executable, "-m", "flake8", *LINTED],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_isort_and_black_clean():
    pytest.importorskip("isort")
    pytest.importorskip("black")
    for tool in (["isort", "--check-only", "-q"], ["black", "--check", "-q"]):
        result = subprocess.run(
            [sys.executable, "-m", *tool, *LINTED], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{tool[0]}: " + result.stdout + result.stderr

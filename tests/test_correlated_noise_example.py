"""examples/banded_mf.py and benchmarks/banded_mf_accuracy.py run with tiny settings; the
epsilon they report is the DP-SGD accountant's at the reduced arguments."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_banded_mf_example_reports_the_reduced_epsilon():
    pytest.importorskip("sklearn")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "banded_mf.py"),
            "--no-progress",
            "--epochs",
            "1",
            "--bands",
            "3",
            "--target-epsilon",
            "2",
            "--compare",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT: ")][-1]
    eps = float(re.search(r"at eps ([0-9.]+)", line).group(1))
    reduced = float(re.search(r"reduced eps ([0-9.]+)", line).group(1))
    assert eps == reduced and 1.9 <= eps <= 2.0
    assert "bands 3" in line and "DP-SGD accuracy" in line
    for acc in re.findall(r"accuracy ([0-9.]+)", line):
        assert 0.0 <= float(acc) <= 1.0


@pytest.mark.slow
def test_benchmark_quick_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    sys.path.insert(0, ROOT)
    from benchmarks import banded_mf_accuracy as bench

    md, js, png = tmp_path / "t.md", tmp_path / "r.json", tmp_path / "p.png"
    runs = bench.main(
        ["--quick", "--tasks", "digits", "--out-md", str(md), "--out-json", str(js)]
        + ["--out-png", str(png)]
    )
    assert {r["bands"] for r in runs} == {1, 2}
    assert all(abs(r["eps_spent"] - 3.0) <= 0.05 for r in runs)
    table = md.read_text()
    assert "| digits | DP-SGD |" in table and "| digits | banded MF b=2 |" in table
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"

"""Smoke test of ``benchmarks/run.py``: tiny models, every mode, JSON and Markdown output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run

ROOT = Path(__file__).resolve().parents[1]


def test_runner_quick_all_models_and_modes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = run.main(["--quick", "--batch-size", "4", "--json", str(out)])
    rows = result["rows"]
    assert {(r["model"], r["mode"]) for r in rows} == {
        (m, mode) for m in run.WORKLOADS for mode in run.MODES
    }
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    for r in rows:
        assert r["plain_ms"] > 0 and r["dp_ms"] > 0
        assert r["ratio"] == pytest.approx(r["dp_ms"] / r["plain_ms"])
        assert r["dp_peak_mb"] >= 0
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    assert {a["what"].split()[0] for a in result["accountants"]} == {"rdp", "prv"}
    table = capsys.readouterr().out
    assert "| mlp | hooks |" in table and "| attention_sf | ghost |" in table


def test_runner_rejects_unknown_model():
    with pytest.raises(SystemExit, match="unknown"):
        run.main(["--quick", "--models", "resnet9000"])


def test_peak_memory_sees_a_large_allocation():
    import torch

    def step():
        x = torch.ones(1 << 20)  # 4 MiB, freed at return
        x.mul_(2)

    assert run.peak_memory(step, torch.device("cpu")) >= 4 << 20


@pytest.mark.parametrize("argv", [["-m", "benchmarks.run"], ["benchmarks/run.py"]])
def test_runner_runs_as_script_and_module(argv):
    cmd = [
        sys.executable,
        *argv,
        "--quick",
        "--batch-size",
        "2",
        "--models",
        "mlp",
        "--modes",
        "hooks",
        "--no-accountants",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| mlp | hooks |" in proc.stdout

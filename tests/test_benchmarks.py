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
        (name, mode) for name, w in run.WORKLOADS.items() for mode in w.modes
    }
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    skipped = {r["model"] for r in rows if "skipped" in r}
    assert skipped == {name for name, w in run.WORKLOADS.items() if w.missing()}
    rows = [r for r in rows if "skipped" not in r]
    assert {"hooks_direct", "ghost_direct"} <= {r["mode"] for r in rows if r["model"] == "mlp"}
    for r in rows:
        assert r["plain_ms"] > 0 and r["dp_ms"] > 0
        assert r["ratio"] == pytest.approx(r["dp_ms"] / r["plain_ms"])
        assert r["dp_peak_mb"] >= 0
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    assert {a["what"].split()[0] for a in result["accountants"]} == {"rdp", "prv"}
    table = capsys.readouterr().out
    assert "| mlp | hooks |" in table and "| attention_sf | ghost |" in table


def test_rows_of_a_workload_without_its_package_are_skipped(monkeypatch):
    w = run.WORKLOADS["gpt2_lora"]
    monkeypatch.setattr(w, "requires", ("transformers", "no_such_package_w18"))
    args = run.parse_args(["--quick"])
    rows = run.bench_model(w, list(run.MODES), args, __import__("torch").device("cpu"))
    assert rows == [
        {"model": "gpt2_lora", "mode": m, "skipped": "needs no_such_package_w18"} for m in w.modes
    ]
    assert "| gpt2_lora | hooks | skipped: needs no_such_package_w18 |" in run.to_markdown(
        rows, [], ""
    )


def test_lm_workloads_are_the_issue_sizes():
    """GPT-2-style LM: 4 layers, width 256, 4 heads, vocab 4096; seq 128 (and 512), batch 8."""
    pytest.importorskip("transformers")
    lm = run.WORKLOADS["gpt2"].build("full")
    cfg = lm.lm.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size) == (4, 256, 4, 4096)
    assert lm.lm.lm_head.weight is lm.lm.transformer.wte.weight  # tied, as GPT-2
    for name, seq in [("gpt2", 128), ("gpt2_seq512", 512)]:
        w = run.WORKLOADS[name]
        x, y = w.make_batch(w.batch_size, "full")
        assert x.shape == y.shape == (8, seq)
    logits = lm(x[:, :128])
    assert logits.shape == (8, 128, 4096)


def test_lora_workload_trains_only_the_adapters():
    pytest.importorskip("peft")
    lm = run.WORKLOADS["gpt2_lora"].build("tiny")
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("c_attn" in n for n in trainable) and any("c_proj" in n for n in trainable)


def test_profile_step_prints_both_profiles(capsys):
    from benchmarks import profile_step

    times = profile_step.main(
        ["--model", "mlp", "--mode", "ghost_direct", "--quick", "--repeats", "1", "--top", "12"]
    )
    assert times["dp"] > 0 and times["plain"] > 0
    out = capsys.readouterr().out
    assert "## mlp / ghost_direct: DP" in out
    assert "cProfile of 1 DP steps" in out and "one non-private step" in out
    assert "double_backward" in out  # the library's own functions are listed


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


@pytest.mark.parametrize("name", ["mlp", "embedding"])
def test_floor_steps_by_hand_compute_the_library_update(name, monkeypatch):
    """``benchmarks.floor``'s hand-written ghost steps are the library's step (same noise seed):
    their time is a floor for the library's, not a cheaper computation. Clipping is active: the
    same step without it gives another update."""
    import copy

    import torch

    from benchmarks import floor
    from benchmarks.models import WORKLOADS

    w = WORKLOADS[name]
    torch.manual_seed(0)
    base = w.build("tiny")
    x, y = w.make_batch(8, "tiny")
    if name == "embedding":
        base.embedding.weight.data.mul_(30)  # per-sample norms above the bound of 1
    hand, lib, unclipped = (copy.deepcopy(base) for _ in range(3))
    step = run._direct_dp_step(lib, x, y, "ghost_direct", True)
    for seed in (100, 101):
        torch.manual_seed(seed)
        floor.BY_HAND[name](hand, x, y)
        torch.manual_seed(seed)
        step()
    for a, b in zip(hand.parameters(), lib.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(floor, "_clip", lambda squared: torch.ones_like(squared))
    for seed in (100, 101):
        torch.manual_seed(seed)
        floor.BY_HAND[name](unclipped, x, y)
    assert any(not torch.allclose(a, b) for a, b in zip(unclipped.parameters(), lib.parameters()))


def test_floor_quick_prints_every_step(capsys):
    from benchmarks import floor

    rows = floor.main(["--quick"])
    assert [r["model"] for r in rows] == ["mlp", "embedding"]
    for r in rows:
        assert set(r["ratio"]) == {"plain", "plain+noise", "by hand", "library"}
        assert r["ratio"]["plain"] == 1.0
    assert "| mlp |" in capsys.readouterr().out


def test_shared_baseline_rows_divide_by_one_non_private_median():
    rows = run.main(
        [
            "--quick",
            "--models",
            "mlp",
            "--modes",
            "hooks,ghost",
            "--no-accountants",
            "--shared-baseline",
        ]
    )
    rows = rows["rows"]
    assert [r["mode"] for r in rows] == ["hooks", "ghost"]
    assert rows[0]["plain_ms"] == rows[1]["plain_ms"] > 0
    for r in rows:
        assert r["ratio"] == r["dp_ms"] / r["plain_ms"]

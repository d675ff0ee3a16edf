"""Runs every example script with tiny settings, as a user would (a subprocess each).

Checks the final ``RESULT:`` line and, where an independent oracle exists, the numbers in it:
the epsilon that digits reports against Google's ``dp_accounting``, DP training against chance,
ghost clipping against per-sample (hooks) clipping, both tensor layouts of the text model against
each other, and the distributed replicas against each other.
"""

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = [
    "digits",
    "text_classification",
    "char_lstm",
    "ghost_clipping",
    "distributed",
    "privacy_utility_plot",
]


def run_example(name, *args, timeout=120):
    """Runs ``examples/<name>.py`` and returns its stdout; fails with its output if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, f"{name}.py"), "--no-progress", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def result_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT: ")]
    assert lines, f"no RESULT line in:\n{stdout}"
    return lines[-1]


def number_after(text, key):
    match = re.search(re.escape(key) + r"\s+([-+0-9.e]+|nan|inf)", text)
    assert match, f"{key!r} not in {text!r}"
    return float(match.group(1))


def load_module(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", f"{EXAMPLES}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_defaults(name, capsys):
    module = load_module(name)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--no-progress" in out
    args = module.parse_args([])  # the defaults parse
    assert args.no_progress is False


def _dp_accounting_epsilon(sigma, sample_rate, steps, delta):
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


def test_digits_dp_beats_chance_and_reports_the_right_epsilon():
    out = run_example("digits", "--epochs", "2", "--sigma", "1.0", "--batch-size", "64")
    result = result_line(out)
    assert number_after(result, "test accuracy") > 0.3, out  # chance is 0.1
    assert "prv accountant" in result
    # 1438 training images, batch 64: 23 logical batches per epoch, sample rate 1/23.
    expected = _dp_accounting_epsilon(1.0, 1 / 23, 2 * 23, 1e-5)
    assert number_after(result, "at eps") == pytest.approx(expected, rel=0.03), out


def test_digits_without_privacy():
    result = result_line(run_example("digits", "--disable-dp", "--epochs", "3"))
    assert "without privacy" in result
    assert number_after(result, "test accuracy") > 0.7


def test_digits_torchvision_datasets_fail_clearly_without_torchvision():
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "digits.py"), "--dataset", "mnist"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "torchvision" in proc.stderr and "--dataset digits" in proc.stderr


def test_text_classification_layouts_agree():
    # Same seed, same Poisson batches and noise: the batch-first and seq-first layouts of the
    # same model must train identically (Opacus 1.6 crashed on, or silently mixed samples in,
    # DPMultiheadAttention(batch_first=True) next to nn.Linear).
    args = ("--epochs", "2", "--batch-size", "64")
    first = result_line(run_example("text_classification", *args))
    seq = result_line(run_example("text_classification", *args, "--layout", "seq-first"))
    assert "layout batch-first" in first and "layout seq-first" in seq
    assert number_after(first, "test accuracy") == number_after(seq, "test accuracy")
    assert number_after(first, "eps") == number_after(seq, "eps")
    assert math.isfinite(number_after(first, "eps"))


def test_text_classification_learns_without_privacy():
    result = result_line(run_example("text_classification", "--disable-dp", "--epochs", "4"))
    assert number_after(result, "test accuracy") > 0.8  # 4 classes: chance is 0.25


def test_char_lstm_dp_beats_chance():
    result = result_line(run_example("char_lstm", "--epochs", "5"))
    assert number_after(result, "test accuracy") > 0.6  # 3 classes: chance is 1/3
    assert math.isfinite(number_after(result, "eps"))


@pytest.mark.slow
def test_ghost_clipping_matches_hooks_with_less_memory():
    out = run_example(
        "ghost_clipping",
        "--buckets",
        "16384",
        "--dim",
        "64",
        "--hidden",
        "256",
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--max-steps",
        "3",
    )
    result = result_line(out)
    hooks_mem = number_after(result, "training memory hooks")
    ghost_mem = number_after(result, "vs ghost")
    # hooks materialises 64 x ~1.1M per-sample gradients (~270 MiB); ghost never does
    assert hooks_mem > ghost_mem + 100, out
    # same seed, same batches, same noise: the same clipped, noised updates
    assert number_after(result, "test accuracy hooks") == number_after(result, ", ghost")


@pytest.mark.slow
def test_distributed_two_gloo_processes():
    result = result_line(
        run_example(
            "distributed",
            "--spawn",
            "--world-size",
            "2",
            "--epochs",
            "1",
            "--max-steps",
            "4",
        )
    )
    assert "2 processes" in result and "replicas in sync: True" in result
    assert math.isfinite(number_after(result, "at eps"))


def test_privacy_utility_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    result = result_line(
        run_example(
            "privacy_utility_plot",
            "--sigmas",
            "1.0",
            "4.0",
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--accountant-epochs",
            "3",
            "--output",
            str(png),
        )
    )
    assert "2 DP runs" in result
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def _fake_torchvision(monkeypatch, dataset_cls):
    import types

    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(MNIST=dataset_cls, CIFAR10=dataset_cls)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = lambda steps: ("compose", steps)
    transforms.ToTensor = lambda: "to_tensor"
    transforms.Normalize = lambda mean, std: ("normalize", mean, std)
    tv.transforms = transforms
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", transforms)


def test_digits_torchvision_loader_never_downloads_by_default(monkeypatch, tmp_path):
    calls = []

    class FakeDataset:
        def __init__(self, root, train, download, transform):
            calls.append((root, train, download))

    _fake_torchvision(monkeypatch, FakeDataset)
    digits = load_module("digits")
    args = digits.parse_args(["--dataset", "mnist", "--data-root", str(tmp_path)])
    digits.load_torchvision(args.dataset, args.data_root, args.download)
    assert calls == [(str(tmp_path), True, False), (str(tmp_path), False, False)]
    args = digits.parse_args(["--dataset", "cifar10", "--download"])
    digits.load_torchvision(args.dataset, args.data_root, args.download)
    assert calls[-1][2] is True
    # the model adapts to the image size and channels
    import torch

    for name, shape in (("mnist", (2, 1, 28, 28)), ("cifar10", (2, 3, 32, 32))):
        assert digits.make_model(name)(torch.zeros(shape)).shape == (2, 10)


def test_digits_missing_torchvision_data_is_a_clear_error(monkeypatch, tmp_path):
    class MissingDataset:
        def __init__(self, root, train, download, transform):
            raise RuntimeError("Dataset not found. You can use download=True to download it")

    _fake_torchvision(monkeypatch, MissingDataset)
    digits = load_module("digits")
    with pytest.raises(SystemExit, match="--data-root.*--download"):
        digits.load_torchvision("mnist", str(tmp_path), False)

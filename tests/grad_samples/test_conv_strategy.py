"""How ``compute_conv_grad_sample`` picks its strategy: timed once per key, cached, bounded.

The timing is made deterministic by a fake clock that the wrapped strategies advance.
"""

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import buffers, conv
from opacus.grad_sample.conv import (
    clear_conv_strategy_cache,
    compute_conv_grad_sample,
    set_conv_strategy,
)
from tests.grad_samples.test_conv import by_name, oracle
from tests.oracle import assert_grad_samples_close

NAMES = ("unfold", "unfold_transposed", "convolution")

pytestmark = pytest.mark.usefixtures("auto_conv_strategy")


@pytest.fixture
def spies(monkeypatch):
    """Count strategy runs and timing rounds on a fake clock: only ``spies.fast`` is fast."""

    class Spies:
        fast = "convolution"
        calls = {name: 0 for name in NAMES}
        tunings = 0
        now = 0.0

    real = dict(conv._STRATEGIES)

    def wrap(name):
        def run(*args):
            Spies.calls[name] += 1
            Spies.now += 1.0 if name == Spies.fast else 10.0
            return real[name](*args)

        return run

    for name in NAMES:
        monkeypatch.setitem(conv._STRATEGIES, name, wrap(name))
    monkeypatch.setattr(conv, "_clock", lambda: Spies.now)
    real_autotune = conv._autotune

    def autotune(*args):
        Spies.tunings += 1
        return real_autotune(*args)

    monkeypatch.setattr(conv, "_autotune", autotune)
    return Spies


TUNING_RUNS = 1 + conv.TIMED_RUNS  # warm-up + timed runs of each strategy


def run_checked(layer, shape, dtype=torch.float64):
    x = torch.randn(*shape, dtype=dtype)
    r = torch.randn_like(layer(x))
    got = by_name(layer, compute_conv_grad_sample(layer, [x], r))
    tol = {"atol": 1e-10, "rtol": 1e-9} if dtype == torch.float64 else {}
    assert_grad_samples_close(got, oracle(layer, x, r), **tol)


@pytest.mark.parametrize("fast", NAMES)
def test_auto_keeps_the_fastest_strategy(spies, fast):
    spies.fast = fast
    layer = nn.Conv2d(2, 3, 3, padding=1).double()
    run_checked(layer, (2, 2, 5, 5))
    assert spies.tunings == 1
    assert spies.calls == {name: TUNING_RUNS for name in NAMES}
    assert list(conv._choices.values()) == [fast]
    run_checked(layer, (2, 2, 5, 5))
    assert spies.tunings == 1
    assert spies.calls == {name: TUNING_RUNS + (name == fast) for name in NAMES}


def test_auto_caches_per_key_not_per_batch_size(spies):
    layer = nn.Conv1d(2, 4, 3, groups=2).double()
    run_checked(layer, (3, 2, 7))
    run_checked(layer, (1, 2, 7))
    run_checked(layer, (5, 2, 7))
    assert spies.tunings == 1 and len(conv._choices) == 1
    assert spies.calls["convolution"] == TUNING_RUNS + 2
    # Another per-sample shape, dtype or layer configuration is another key.
    run_checked(layer, (3, 2, 8))
    run_checked(layer.float(), (3, 2, 8), dtype=torch.float32)
    other = nn.Conv1d(2, 4, 3, stride=2).double()
    run_checked(other, (3, 2, 8))
    assert spies.tunings == 4 and len(conv._choices) == 4
    # An identical layer shares the cached choice.
    run_checked(nn.Conv1d(2, 4, 3, stride=2).double(), (2, 2, 8))
    assert spies.tunings == 4
    clear_conv_strategy_cache()
    run_checked(other, (3, 2, 8))
    assert spies.tunings == 5


def test_bounded_autotune_falls_back_to_the_most_frequent_winner(spies, monkeypatch):
    monkeypatch.setattr(conv, "MAX_TUNED_SHAPES", 3)
    layer = nn.Conv1d(2, 3, 3, padding=1).double()
    spies.fast = "convolution"
    run_checked(layer, (2, 2, 4))
    spies.fast = "unfold_transposed"
    for length in (5, 6):
        run_checked(layer, (2, 2, length))
    assert spies.tunings == 3
    before = dict(spies.calls)
    for length in (7, 8, 9, 7):
        run_checked(layer, (2, 2, length))
    assert spies.tunings == 3 and len(conv._choices) == 3
    # Untimed: one run per call, with the strategy that won two of the three timings.
    assert spies.calls["unfold_transposed"] == before["unfold_transposed"] + 4
    assert spies.calls["convolution"] == before["convolution"]
    # The bound is per layer configuration.
    run_checked(nn.Conv1d(2, 3, 3, padding=2).double(), (2, 2, 7))
    assert spies.tunings == 4


@pytest.mark.parametrize("strategy", ["auto", "convolution", "unfold_transposed"])
def test_deterministic_mode_always_unfolds(spies, strategy):
    set_conv_strategy(strategy)
    layer = nn.Conv2d(2, 3, 2, stride=2).double()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        run_checked(layer, (3, 2, 6, 6))
        run_checked(layer, (3, 2, 6, 6))
    finally:
        torch.use_deterministic_algorithms(was)
    assert spies.tunings == 0 and not conv._choices
    assert spies.calls == {"unfold": 2, "unfold_transposed": 0, "convolution": 0}


@pytest.mark.parametrize("strategy", NAMES)
def test_forced_strategy_runs_alone(spies, strategy):
    set_conv_strategy(strategy)
    run_checked(nn.Conv3d(2, 2, 2, groups=2).double(), (2, 2, 3, 3, 3))
    assert spies.tunings == 0
    assert spies.calls == {name: int(name == strategy) for name in NAMES}


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="set_conv_strategy.*'im2col'"):
        set_conv_strategy("im2col")


def test_grouped_convolution_keeps_no_im2col_buffer(spies):
    """Timing runs pool their buffers apart; the grouped path pools nothing on the layer."""
    layer = nn.Conv2d(16, 16, 3, padding=1)
    x, r = torch.randn(8, 16, 32, 32), torch.randn(8, 16, 32, 32)
    assert 8 * 16 * 9 * 32 * 32 * 4 > buffers.MIN_POOLED_BYTES  # the im2col would be pooled
    with torch.no_grad():
        for _ in range(2):
            compute_conv_grad_sample(layer, [x], r)
    assert list(conv._choices.values()) == ["convolution"]
    assert "im2col" not in buffers._pools.get(layer, {})
    set_conv_strategy("unfold")
    with torch.no_grad():
        compute_conv_grad_sample(layer, [x], r)
    assert "im2col" in buffers._pools.get(layer, {})


def test_batch_of_zero():
    layer = nn.Conv2d(2, 3, 3)
    for strategy in NAMES + ("auto",):
        set_conv_strategy(strategy)
        got = compute_conv_grad_sample(layer, [torch.randn(0, 2, 5, 5)], torch.randn(0, 3, 3, 3))
        assert got[layer.weight].shape == (0, 3, 2, 3, 3)

"""DPTensorFastGradientClipping: construction stores its arguments, item/detach, arithmetic on
the per-sample losses (behaviour contract, cluster 14), with the contract's exact values."""

from unittest.mock import MagicMock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.utils.adaptive_clipping import DPTensorFastGradientAdaptiveClipping
from opacus.utils.fast_gradient_clipping_utils import (
    ClippedSumHooks,
    DPTensorFastGradientClipping,
)


def _tensor(values=(1.0, 2.0, 3.0), reduction="mean", module=None, optimizer=None):
    return DPTensorFastGradientClipping(
        module if module is not None else MagicMock(),
        optimizer if optimizer is not None else MagicMock(),
        torch.tensor(values),
        reduction,
    )


def test_construction_only_stores_mocks():
    module, optimizer = MagicMock(), MagicMock()
    loss = torch.tensor([1.0, 2.0, 3.0])
    t = DPTensorFastGradientClipping(module, optimizer, loss, "sum")
    assert t.module is module and t.optimizer is optimizer
    assert t.loss_per_sample is loss and t.loss_reduction == "sum"
    assert module.mock_calls == [] and optimizer.mock_calls == []
    assert DPTensorFastGradientClipping(module, optimizer, loss).loss_reduction == "mean"


def test_item_and_detach_exact_values():
    assert _tensor(reduction="mean").item() == 2.0
    assert _tensor(reduction="sum").item() == 6.0
    assert isinstance(_tensor().item(), float)
    leaf = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    t = DPTensorFastGradientClipping(MagicMock(), MagicMock(), leaf * 1.0, "sum")
    d = t.detach()
    assert torch.is_tensor(d) and not d.requires_grad and d.item() == 6.0
    with pytest.raises(ValueError, match="loss_reduction"):
        _tensor(reduction="none").item()
    assert "reduction='none'" in repr(_tensor(reduction="none"))  # repr never raises
    assert "6." in str(_tensor(reduction="sum"))


def _same_context(result, t):
    assert type(result) is type(t)
    assert result.module is t.module and result.optimizer is t.optimizer
    assert result.loss_reduction == t.loss_reduction
    assert result is not t


@pytest.mark.parametrize(
    "op,expected",
    [
        (lambda t: t + 2.0, [3.0, 4.0, 5.0]),
        (lambda t: 2.0 + t, [3.0, 4.0, 5.0]),
        (lambda t: t - 2.0, [-1.0, 0.0, 1.0]),
        (lambda t: 2.0 - t, [1.0, 0.0, -1.0]),
        (lambda t: t * 2.0, [2.0, 4.0, 6.0]),
        (lambda t: 2.0 * t, [2.0, 4.0, 6.0]),
        (lambda t: t / 2.0, [0.5, 1.0, 1.5]),
        (lambda t: -t, [-1.0, -2.0, -3.0]),
        (lambda t: t + torch.tensor([1.0, 0.0, -1.0]), [2.0, 2.0, 2.0]),
        (lambda t: torch.tensor([1.0, 0.0, -1.0]) + t, [2.0, 2.0, 2.0]),
        (lambda t: torch.tensor([1.0, 0.0, -1.0]) - t, [0.0, -2.0, -4.0]),
        (lambda t: torch.tensor(2.0) * t, [2.0, 4.0, 6.0]),
        (lambda t: t / torch.tensor([1.0, 2.0, 4.0]), [1.0, 1.0, 0.75]),
    ],
)
def test_arithmetic_acts_on_per_sample_losses(op, expected):
    t = _tensor()
    result = op(t)
    _same_context(result, t)
    assert result.loss_per_sample.tolist() == expected
    assert t.loss_per_sample.tolist() == [1.0, 2.0, 3.0]  # the operand is unchanged


def test_two_dp_tensors_add_and_subtract():
    t1, t2 = _tensor(), _tensor((10.0, 20.0, 30.0))
    assert (t1 + t2).loss_per_sample.tolist() == [11.0, 22.0, 33.0]
    assert (t2 - t1).loss_per_sample.tolist() == [9.0, 18.0, 27.0]
    assert (t1 + t2).item() == 22.0
    _same_context(t1 + t2, t1)
    with pytest.raises(ValueError, match="loss_reduction"):
        t1 + _tensor(reduction="sum")
    with pytest.raises(ValueError, match="loss_reduction"):
        t1 - _tensor(reduction="sum")
    with pytest.raises(TypeError, match="not defined"):
        t1 * t2
    with pytest.raises(TypeError, match="not defined"):
        t1 / t2


def test_arithmetic_keeps_the_adaptive_subclass_and_its_settings():
    from opacus.utils.adaptive_clipping.adaptive_clipping_utils import (
        DPOptimizerFastGradientAdaptiveClipping,
    )

    optimizer = MagicMock(spec=DPOptimizerFastGradientAdaptiveClipping)
    t = DPTensorFastGradientAdaptiveClipping(
        MagicMock(), optimizer, torch.tensor([1.0, 2.0]), "sum", target_unclipped_quantile=0.3
    )
    for result in (t * 0.5, 0.5 * t, t + t, -t, t / 2, 1 - t):
        assert type(result) is DPTensorFastGradientAdaptiveClipping
        assert result.target_unclipped_quantile == 0.3
        assert result.unclipped_num_std == t.unclipped_num_std


@settings(max_examples=25, deadline=None)
@given(
    losses=st.lists(st.floats(-100, 100), min_size=1, max_size=6),
    scale=st.floats(-10, 10).filter(lambda v: abs(v) > 1e-3),
    shift=st.floats(-10, 10),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_item_of_an_affine_combination_is_that_of_the_reduced_loss(losses, scale, shift, reduction):
    t = _tensor(tuple(losses), reduction)
    value = ((t * scale) + shift - t / scale).item()
    x = torch.tensor(losses)
    per_sample = x * scale + shift - x / scale
    expected = per_sample.mean() if reduction == "mean" else per_sample.sum()
    assert value == pytest.approx(expected.item(), rel=1e-5, abs=1e-4)


def test_backward_needs_a_clipped_sum_module_and_checks_its_reduction():
    # The loss talks to the module through the explicit ClippedSumHooks interface: an object
    # that does not implement it is refused by name (no attribute probing with fallbacks).
    loss = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(TypeError, match="ClippedSumHooks"):
        DPTensorFastGradientClipping(MagicMock(), MagicMock(), loss * 1.0, "sum").backward()
    module = MagicMock(spec=ClippedSumHooks)
    module.loss_reduction = "mean"
    with pytest.raises(ValueError, match="differs from the module's"):
        DPTensorFastGradientClipping(module, MagicMock(), loss * 1.0, "sum").backward()
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        DPTensorFastGradientClipping(module, MagicMock(), loss * 1.0, "max").backward()

"""grad_sample_mode="ew": PyTorch's expanded weights vs the brute-force oracle and the hooks."""

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModule, GradSampleModuleExpandedWeights, wrap_model
from opacus.grad_sample.gsm_exp_weights import _call_for_per_sample_grads
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples, grad_samples_of

pytestmark = pytest.mark.skipif(
    _call_for_per_sample_grads() is None,
    reason="this torch has no torch.nn.utils._per_sample_grad.call_for_per_sample_grads",
)


def _model():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ew_matches_brute_force_and_hooks(reduction):
    torch.manual_seed(0)
    model = _model()
    x = torch.randn(5, 4)
    expected = brute_force_grad_samples(model, x)
    ew = wrap_model(model, grad_sample_mode="ew", loss_reduction=reduction)
    assert isinstance(ew, GradSampleModuleExpandedWeights)
    out = ew(x)
    (out.sum() / 5 if reduction == "mean" else out.sum()).backward()
    assert_grad_samples_close(grad_samples_of(ew), expected)
    via_ew = {n: g.clone() for n, g in grad_samples_of(ew).items()}
    ew.to_standard_module()
    hooks = GradSampleModule(model, loss_reduction=reduction)
    out = hooks(x)
    (out.sum() / 5 if reduction == "mean" else out.sum()).backward()
    assert_grad_samples_close(grad_samples_of(hooks), via_ew)


def test_ew_time_major_is_refused():
    with pytest.raises(NotImplementedError, match="batch_first=True only"):
        GradSampleModuleExpandedWeights(_model(), batch_first=False)


def test_ew_refuses_accumulation():
    model = _model()
    ew = GradSampleModuleExpandedWeights(model, loss_reduction="sum")
    x = torch.randn(2, 4)
    ew(x).sum().backward()
    first = {n: g.clone() for n, g in grad_samples_of(ew).items()}
    with pytest.raises(ValueError, match="(?s)accumulation is not supported.*'hooks'"):
        ew(torch.randn(2, 4)).sum().backward()
    assert_grad_samples_close(grad_samples_of(ew), first)  # the first pass is untouched
    ew.zero_grad()
    ew(x).sum().backward()
    assert_grad_samples_close(grad_samples_of(ew), first)

"""nn.Linear per-sample gradients vs the brute-force oracle (backprops = gradient of <out, R>)."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.grad_sample.registry import GRAD_SAMPLERS
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples


def oracle(layer, inputs, backprops):
    """Per-sample grads of loss_i = <layer(x_i), R_i>, whose output gradient is exactly R_i."""
    return brute_force_grad_samples(
        layer, inputs, loss_fn=lambda out, r: (out * r).sum(), targets=backprops
    )


def by_name(layer, grads):
    names = {p: n for n, p in layer.named_parameters()}
    return {names[p]: g for p, g in grads.items()}


def test_registered():
    assert GRAD_SAMPLERS[nn.Linear] is compute_linear_grad_sample


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    middle=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    d_in=st.integers(1, 5),
    d_out=st.integers(1, 5),
    bias=st.booleans(),
)
def test_linear_matches_oracle(batch, middle, d_in, d_out, bias):
    """2-D, 3-D and 4-D inputs: every dim between batch and features is summed over."""
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out, bias=bias).double()
    x = torch.randn(batch, *middle, d_in, dtype=torch.float64)
    r = torch.randn(batch, *middle, d_out, dtype=torch.float64)
    got = by_name(layer, compute_linear_grad_sample(layer, [x], r))
    assert_grad_samples_close(got, oracle(layer, x, r), atol=1e-10, rtol=1e-10)


def test_linear_float32_sequence():
    torch.manual_seed(1)
    layer = nn.Linear(7, 3)
    x, r = torch.randn(5, 4, 7), torch.randn(5, 4, 3)
    got = by_name(layer, compute_linear_grad_sample(layer, [x], r))
    assert_grad_samples_close(got, oracle(layer, x, r))


def test_frozen_params_are_skipped():
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    got = compute_linear_grad_sample(layer, [torch.randn(4, 3)], torch.randn(4, 2))
    assert set(got) == {layer.weight}
    assert got[layer.weight].shape == (4, 2, 3)
    layer.weight.requires_grad_(False)
    assert compute_linear_grad_sample(layer, [torch.randn(4, 3)], torch.randn(4, 2)) == {}


@pytest.mark.parametrize("batch", [1, 3])
def test_sum_over_samples_is_the_batch_gradient(batch):
    """Independent check: the per-sample grads add up to autograd's batch gradient."""
    torch.manual_seed(2)
    layer = nn.Linear(4, 3).double()
    x = torch.randn(batch, 2, 4, dtype=torch.float64)
    r = torch.randn(batch, 2, 3, dtype=torch.float64)
    (layer(x) * r).sum().backward()
    got = compute_linear_grad_sample(layer, [x], r)
    torch.testing.assert_close(got[layer.weight].sum(0), layer.weight.grad)
    torch.testing.assert_close(got[layer.bias].sum(0), layer.bias.grad)


def test_mixed_precision_inputs_are_promoted():
    """bfloat16 backprops with float32 activations (autocast) compute in float32."""
    layer = nn.Linear(3, 2)
    x, r = torch.randn(4, 5, 3), torch.randn(4, 5, 2).bfloat16()
    got = compute_linear_grad_sample(layer, [x], r)
    assert got[layer.weight].dtype == torch.float32
    expected = compute_linear_grad_sample(layer, [x], r.float())
    torch.testing.assert_close(got[layer.weight], expected[layer.weight])

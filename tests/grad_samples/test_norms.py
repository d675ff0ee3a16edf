"""LayerNorm / GroupNorm / InstanceNorm / RMSNorm per-sample gradients vs the brute-force oracle."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.grad_sample.instance_norm import compute_instance_norm_grad_sample
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.grad_sample.registry import GRAD_SAMPLERS
from opacus.grad_sample.rms_norm import compute_rms_norm_grad_sample
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples

TIGHT = dict(atol=1e-10, rtol=1e-9)


def check(layer, sampler, x, **tol):
    """Per-sample grads of loss_i = <layer(x_i), R_i> (output gradient R_i) vs the oracle."""
    r = torch.randn_like(layer(x))
    expected = brute_force_grad_samples(layer, x, loss_fn=lambda out, t: (out * t).sum(), targets=r)
    names = {p: n for n, p in layer.named_parameters()}
    got = {names[p]: g for p, g in sampler(layer, [x], r).items()}
    assert_grad_samples_close(got, expected, **(tol or TIGHT))


def test_registered():
    assert GRAD_SAMPLERS[nn.LayerNorm] is compute_layer_norm_grad_sample
    assert GRAD_SAMPLERS[nn.GroupNorm] is compute_group_norm_grad_sample
    assert GRAD_SAMPLERS[nn.RMSNorm] is compute_rms_norm_grad_sample
    for cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        assert GRAD_SAMPLERS[cls] is compute_instance_norm_grad_sample


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    lead=st.lists(st.integers(1, 3), max_size=2),
    normalized=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    bias=st.booleans(),
    eps=st.sampled_from([1e-5, 0.1]),
)
def test_layer_norm(batch, lead, normalized, bias, eps):
    torch.manual_seed(0)
    layer = nn.LayerNorm(normalized, eps=eps, bias=bias).double()
    with torch.no_grad():
        layer.weight.normal_()
    check(layer, compute_layer_norm_grad_sample, torch.randn(batch, *lead, *normalized).double())


def test_layer_norm_without_affine_has_no_params():
    layer = nn.LayerNorm(4, elementwise_affine=False)
    assert compute_layer_norm_grad_sample(layer, [torch.randn(2, 4)], torch.randn(2, 4)) == {}


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    groups_and_channels=st.sampled_from([(1, 3), (2, 4), (3, 6), (4, 4)]),
    spatial=st.lists(st.integers(1, 4), max_size=3),
)
def test_group_norm(batch, groups_and_channels, spatial):
    torch.manual_seed(0)
    groups, channels = groups_and_channels
    layer = nn.GroupNorm(groups, channels).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    # Pure-noise normalisation of a single element is 0/0-ish: keep >= 2 elements per group.
    if channels // groups * int(torch.tensor(spatial).prod()) < 2:
        spatial = spatial + [2]
    check(layer, compute_group_norm_grad_sample, torch.randn(batch, channels, *spatial).double())


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("track_running_stats", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_instance_norm(dims, track_running_stats, training):
    torch.manual_seed(0)
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
    layer = cls(3, affine=True, track_running_stats=track_running_stats).double()
    with torch.no_grad():
        layer.weight.normal_()
        if track_running_stats:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    x = torch.randn(2, 3, *([4] * dims)).double()
    check(layer, compute_instance_norm_grad_sample, x)


def test_instance_norm_rejects_unbatched_input():
    layer = nn.InstanceNorm2d(3, affine=True)
    with pytest.raises(ValueError, match="InstanceNorm2d"):
        compute_instance_norm_grad_sample(layer, [torch.randn(3, 4, 4)], torch.randn(3, 4, 4))


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    lead=st.lists(st.integers(1, 3), max_size=2),
    normalized=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    eps=st.sampled_from([None, 1e-6, 0.5]),
)
def test_rms_norm(batch, lead, normalized, eps):
    torch.manual_seed(0)
    layer = nn.RMSNorm(normalized, eps=eps).double()
    with torch.no_grad():
        layer.weight.normal_()
    check(layer, compute_rms_norm_grad_sample, torch.randn(batch, *lead, *normalized).double())


def test_float32():
    torch.manual_seed(0)
    loose = dict(atol=1e-5, rtol=1e-4)
    check(nn.LayerNorm(8), compute_layer_norm_grad_sample, torch.randn(4, 5, 8), **loose)
    check(nn.GroupNorm(2, 4), compute_group_norm_grad_sample, torch.randn(4, 4, 5), **loose)
    check(nn.RMSNorm(8), compute_rms_norm_grad_sample, torch.randn(4, 5, 8), **loose)
    check(
        nn.InstanceNorm1d(4, affine=True),
        compute_instance_norm_grad_sample,
        torch.randn(4, 4, 6),
        **loose,
    )

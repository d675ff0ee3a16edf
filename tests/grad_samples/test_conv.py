"""Conv1d/2d/3d per-sample gradients vs the brute-force oracle, over a hypothesis sweep.

Every case is checked with each forced strategy (im2col + bmm both ways round, grouped
convolution) and with the timed ``"auto"`` choice.
"""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample.conv import (
    compute_conv_grad_sample,
    convolution2d_backward_as_a_convolution,
    set_conv_strategy,
)
from opacus.grad_sample.registry import GRAD_SAMPLERS
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel"),
    pytest.mark.usefixtures("auto_conv_strategy"),
]

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
STRATEGIES = ("unfold", "unfold_transposed", "convolution", "auto")
LAYOUTS = ("contiguous", "channels_last", "strided")


def oracle(layer, inputs, backprops):
    """Per-sample grads of loss_i = <layer(x_i), R_i>, whose output gradient is exactly R_i."""
    return brute_force_grad_samples(
        layer, inputs, loss_fn=lambda out, r: (out * r).sum(), targets=backprops
    )


def by_name(layer, grads):
    names = {p: n for n, p in layer.named_parameters()}
    return {names[p]: g for p, g in grads.items()}


@st.composite
def conv_cases(draw, dims):
    """A small convolution and a batch that fits it (padding, stride, dilation, groups, mode)."""
    groups = draw(st.sampled_from([1, 2]))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    max_k = 3 if dims < 3 else 2
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    # PyTorch rejects padding="same" with strides > 1.
    if padding == "same":
        stride = (1,) * dims
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    if padding == "int":
        padding = draw(st.integers(0, 2))
    elif padding == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    pad_each = [padding] * dims if isinstance(padding, int) else padding
    if padding_mode == "reflect" and not isinstance(padding, str):
        # Reflect padding must be smaller than the input: keep it <= 1 with inputs >= 2.
        pad_each = [min(p, 1) for p in pad_each]
        padding = tuple(pad_each)
    spatial = tuple(d * (k - 1) + 1 + draw(st.integers(1, 3)) for k, d in zip(kernel, dilation))
    batch = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    layout = draw(st.sampled_from(LAYOUTS))
    layer = CONVS[dims](
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
    ).double()
    return layer, (batch, in_channels, *spatial), layout


def in_layout(t, layout):
    """``t``'s values stored channels-last, or as a non-contiguous strided view."""
    if layout == "channels_last" and t.dim() in (4, 5):
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    if layout == "strided":
        # Every other element of a tensor twice as long in the last dim.
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def check(layer, shape, layout="contiguous", samplers=None):
    """Every strategy (or each given sampler) against one oracle run."""
    x = torch.randn(*shape, dtype=torch.float64)
    r = torch.randn_like(layer(x))
    expected = oracle(layer, x, r)
    x, r = in_layout(x, layout), in_layout(r, layout)
    if layout == "strided":
        assert x.stride(-1) == r.stride(-1) == 2
    if samplers is None:
        for strategy in STRATEGIES:
            set_conv_strategy(strategy)
            got = by_name(layer, compute_conv_grad_sample(layer, [x], r))
            assert_grad_samples_close(got, expected, atol=1e-10, rtol=1e-9)
        return
    for sampler in samplers:
        got = by_name(layer, sampler(layer, [x], r))
        assert_grad_samples_close(got, expected, atol=1e-10, rtol=1e-9)


@settings(max_examples=30, deadline=None)
@given(case=conv_cases(1))
def test_conv1d(case):
    check(*case)


@settings(max_examples=30, deadline=None)
@given(case=conv_cases(2))
def test_conv2d(case):
    check(*case)


@settings(max_examples=20, deadline=None)
@given(case=conv_cases(3))
def test_conv3d(case):
    check(*case)


@settings(max_examples=25, deadline=None)
@given(case=conv_cases(2))
def test_conv2d_backward_as_a_convolution(case):
    check(*case, samplers=[convolution2d_backward_as_a_convolution])


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_same_padding_even_kernel_is_asymmetric(dims):
    """Even kernels with padding='same' pad one more element after than before."""
    torch.manual_seed(0)
    layer = CONVS[dims](2, 3, 4, padding="same", dilation=1).double()
    check(layer, (2, 2, *([5] * dims)))
    if dims == 2:
        check(layer, (2, 2, 5, 5), samplers=[convolution2d_backward_as_a_convolution])


def test_float32_and_registration():
    torch.manual_seed(0)
    for cls in CONVS.values():
        assert GRAD_SAMPLERS[cls] is compute_conv_grad_sample
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(4, 3, 8, 8)
    r = torch.randn_like(layer(x))
    got = by_name(layer, compute_conv_grad_sample(layer, [x], r))
    assert_grad_samples_close(got, oracle(layer, x, r))


def test_frozen_bias_and_unbatched_input():
    layer = nn.Conv1d(2, 3, 3)
    layer.bias.requires_grad_(False)
    x = torch.randn(4, 2, 6)
    got = compute_conv_grad_sample(layer, [x], torch.randn(4, 3, 4))
    assert set(got) == {layer.weight} and got[layer.weight].shape == (4, 3, 2, 3)
    with pytest.raises(ValueError, match="batch"):
        compute_conv_grad_sample(layer, [x[0]], torch.randn(3, 4))
    with pytest.raises(ValueError, match="Conv2d"):
        convolution2d_backward_as_a_convolution(layer, [x], torch.randn(4, 3, 4))

"""opacus.utils.tensor_utils vs torch references: F.unfold, F.conv3d, explicit norms and sums."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.utils.tensor_utils import (
    calc_sample_norms,
    calc_sample_norms_one_layer,
    filter_dilated_rows,
    sum_over_all_but_batch_and_last_n,
    unfold2d,
    unfold3d,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")


def small_tuple(lo, hi, n=3):
    return st.tuples(*[st.integers(lo, hi)] * n)


@settings(max_examples=25, deadline=None)
@given(
    kernel=small_tuple(1, 3, 2),
    stride=small_tuple(1, 3, 2),
    dilation=small_tuple(1, 2, 2),
    padding=small_tuple(0, 2, 2),
    extra=small_tuple(0, 3, 2),
)
def test_unfold2d_matches_f_unfold(kernel, stride, dilation, padding, extra):
    size = [d * (k - 1) + 1 + e for k, d, e in zip(kernel, dilation, extra)]
    x = torch.randn(2, 3, *size)
    got = unfold2d(x, kernel_size=kernel, padding=padding, stride=stride, dilation=dilation)
    expected = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def conv_via_unfold(x, weight, cols):
    """A convolution written as weight @ im2col(x): equal to F.conv*d iff the unfolding is right."""
    out = torch.einsum("ok,nkl->nol", weight.reshape(weight.shape[0], -1), cols)
    return out


@settings(max_examples=15, deadline=None)
@given(kernel=small_tuple(1, 4, 2), dilation=small_tuple(1, 2, 2))
def test_unfold2d_same_padding_matches_conv(kernel, dilation):
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    w = torch.randn(4, 3, *kernel, dtype=torch.float64)
    cols = unfold2d(x, kernel_size=kernel, padding="same", stride=(1, 1), dilation=dilation)
    expected = F.conv2d(x, w, padding="same", dilation=dilation)
    torch.testing.assert_close(conv_via_unfold(x, w, cols).reshape(expected.shape), expected)


@settings(max_examples=25, deadline=None)
@given(
    kernel=small_tuple(1, 3),
    stride=small_tuple(1, 2),
    dilation=small_tuple(1, 2),
    padding=st.one_of(st.integers(0, 2), small_tuple(0, 2), st.sampled_from(["same", "valid"])),
    extra=small_tuple(0, 2),
    batch=st.integers(1, 2),
)
def test_unfold3d_matches_conv3d(kernel, stride, dilation, padding, extra, batch):
    if padding == "same":
        stride = (1, 1, 1)
    size = [d * (k - 1) + 1 + e for k, d, e in zip(kernel, dilation, extra)]
    x = torch.randn(batch, 2, *size, dtype=torch.float64)
    w = torch.randn(3, 2, *kernel, dtype=torch.float64)
    cols = unfold3d(x, kernel_size=kernel, padding=padding, stride=stride, dilation=dilation)
    expected = F.conv3d(x, w, padding=padding, stride=stride, dilation=dilation)
    assert cols.shape == (batch, 2 * kernel[0] * kernel[1] * kernel[2], expected[0, 0].numel())
    torch.testing.assert_close(conv_via_unfold(x, w, cols).reshape(expected.shape), expected)


def test_unfold3d_int_arguments():
    x = torch.randn(1, 2, 5, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 2, 2, 2, 2, dtype=torch.float64)
    cols = unfold3d(x, kernel_size=2, padding=1, stride=2, dilation=1)
    expected = F.conv3d(x, w, padding=1, stride=2)
    torch.testing.assert_close(conv_via_unfold(x, w, cols).reshape(expected.shape), expected)


@settings(max_examples=15, deadline=None)
@given(kernel=small_tuple(1, 3), dilation=small_tuple(1, 3))
def test_filter_dilated_rows(kernel, dilation):
    """Unfolding with the dense dilated-size kernel, filtered, is unfolding with dilation."""
    dilated = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    x = torch.randn(2, 2, *[dk + 1 for dk in dilated])
    dense = unfold3d(x, kernel_size=dilated)
    got = filter_dilated_rows(dense, dilation, dilated, kernel)
    torch.testing.assert_close(got, unfold3d(x, kernel_size=kernel, dilation=dilation))


def test_filter_dilated_rows_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="dilated_kernel_size"):
        filter_dilated_rows(torch.zeros(1, 8, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))


def test_unfold_rejects_wrong_rank():
    with pytest.raises(ValueError, match="unfold3d"):
        unfold3d(torch.zeros(1, 2, 3, 3), kernel_size=2)
    with pytest.raises(ValueError, match="unfold2d"):
        unfold2d(torch.zeros(2, 3, 3), kernel_size=(2, 2), padding=0, stride=1, dilation=1)


@pytest.mark.parametrize("n_dims", [0, 1, 2, 3])
def test_sum_over_all_but_batch_and_last_n(n_dims):
    t = torch.randn(2, 3, 4, 5)
    got = sum_over_all_but_batch_and_last_n(t, n_dims)
    expected = t
    while expected.dim() > n_dims + 1:
        expected = expected.sum(dim=1)
    assert got.shape == (2, *t.shape[4 - n_dims :])
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="no batch dim"):
        sum_over_all_but_batch_and_last_n(t, 4)


def test_calc_sample_norms():
    a, b = torch.randn(4, 3, 2), torch.randn(4, 5)
    norm_a = torch.stack([torch.sqrt((a[i] ** 2).sum()) for i in range(4)])
    norm_b = torch.stack([torch.sqrt((b[i] ** 2).sum()) for i in range(4)])
    torch.testing.assert_close(calc_sample_norms_one_layer(a), norm_a)
    per_param = calc_sample_norms([("a", a), ("b", b)], flat=False)
    assert len(per_param) == 2
    torch.testing.assert_close(per_param[0], norm_a)
    torch.testing.assert_close(per_param[1], norm_b)
    (flat,) = calc_sample_norms(iter([("a", a), ("b", b)]))
    torch.testing.assert_close(flat, torch.sqrt(norm_a**2 + norm_b**2))

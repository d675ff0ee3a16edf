"""opacus.optimizers.clipping against sample-by-sample definitions."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.optimizers import clipping
from tests.optimizers.dp_reference import clipped_sum_flat, clipped_sum_per_layer


def _grad_samples(shapes, b, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *s, generator=g, dtype=torch.float64) * 3 for s in shapes]


@settings(max_examples=20, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 5), max_size=3), min_size=1, max_size=4),
    b=st.integers(1, 7),
    seed=st.integers(0, 10_000),
)
def test_per_sample_norms_is_norm_of_concatenation(shapes, b, seed):
    gs = _grad_samples(shapes, b, seed)
    expected = torch.stack([torch.cat([g[i].reshape(-1) for g in gs]).norm() for i in range(b)])
    torch.testing.assert_close(clipping.per_sample_norms(gs), expected)


def test_norms_of_non_contiguous_and_0d_params():
    base = torch.randn(6, 4, 3, dtype=torch.float64)
    gs = [base.transpose(1, 2), torch.randn(6, dtype=torch.float64)]  # (6, 3, 4) view; 0-d param
    assert not gs[0].is_contiguous()
    expected = torch.stack(
        [torch.cat([gs[0][i].reshape(-1), gs[1][i : i + 1]]).norm() for i in range(6)]
    )
    torch.testing.assert_close(clipping.per_sample_norms(gs), expected)


def test_clip_factors_formula():
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 1.0, 1.0 / (1.0 + 1e-6), 1.0 / (4.0 + 1e-6)], dtype=torch.float64)
    torch.testing.assert_close(clipping.clip_factors(norms, 1.0), expected)


@settings(max_examples=20, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 4), max_size=3), min_size=1, max_size=3),
    b=st.integers(0, 6),
    c=st.floats(1e-3, 20.0),
    seed=st.integers(0, 10_000),
)
def test_flat_and_per_layer_sums_match_loops(shapes, b, c, seed):
    gs = _grad_samples(shapes, b, seed)
    for got, exp in zip(clipping.flat_clipped_sums(gs, c), clipped_sum_flat(gs, c)):
        torch.testing.assert_close(got, exp)
    cs = [c * (k + 1) for k in range(len(gs))]
    if b:
        for got, exp in zip(clipping.per_layer_clipped_sums(gs, cs), clipped_sum_per_layer(gs, cs)):
            torch.testing.assert_close(got, exp)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 8), c=st.floats(1e-3, 5.0), seed=st.integers(0, 10_000))
def test_clipped_samples_have_norm_at_most_c(b, c, seed):
    gs = _grad_samples([(3,), (2, 2)], b, seed)
    factors = clipping.clip_factors(clipping.per_sample_norms(gs), c)
    clipped = [g * factors.view(-1, *([1] * (g.dim() - 1))) for g in gs]
    assert (clipping.per_sample_norms(clipped) <= c).all()


def test_unclipped_count():
    norms = torch.tensor([0.1, 1.0, 1.5, 3.0])
    assert clipping.unclipped_count(norms, 1.0).item() == 2


def test_mixed_dtypes_promote():
    gs = [torch.ones(2, 3, dtype=torch.float32), torch.ones(2, 1, dtype=torch.float64)]
    norms = clipping.per_sample_norms(gs)
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, torch.full((2,), 2.0, dtype=torch.float64))
    sums = clipping.flat_clipped_sums(gs, 1.0)
    assert [s.dtype for s in sums] == [torch.float32, torch.float64]


def test_errors():
    with pytest.raises(ValueError, match="batch size"):
        clipping.per_sample_norms([torch.ones(2, 3), torch.ones(3, 3)])
    with pytest.raises(ValueError, match="one value per parameter"):
        clipping.per_layer_clipped_sums([torch.ones(2, 3)], [1.0, 2.0])
    with pytest.raises(ValueError, match="no trainable"):
        clipping.stack_norms([])

"""Ghost-clipping norm samplers vs the norms of brute-force per-sample gradients."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample.embedding import compute_embedding_norm_sample
from opacus.grad_sample.linear import _gram_norm_is_cheaper, compute_linear_norm_sample
from opacus.grad_sample.registry import NORM_SAMPLERS
from tests.oracle import brute_force_grad_samples


def check_norms(layer, sampler, x, r, **tol):
    """Sampler norms == L2 norms of the oracle's per-sample grads of loss_i = <layer(x_i), R_i>."""
    grads = brute_force_grad_samples(layer, x, loss_fn=lambda out, t: (out * t).sum(), targets=r)
    names = {p: n for n, p in layer.named_parameters()}
    got = {names[p]: v for p, v in sampler(layer, [x], r).items()}
    assert set(got) == set(grads)
    for name, g in grads.items():
        assert got[name].shape == (x.shape[0],), name
        expected = g.reshape(g.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(got[name], expected, **(tol or dict(atol=1e-10, rtol=1e-9)))


def test_registered():
    assert NORM_SAMPLERS[nn.Linear] is compute_linear_norm_sample
    assert NORM_SAMPLERS[nn.Embedding] is compute_embedding_norm_sample


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    middle=st.lists(st.integers(1, 4), max_size=2),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    bias=st.booleans(),
)
def test_linear_norms(batch, middle, d_in, d_out, bias):
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out, bias=bias).double()
    x = torch.randn(batch, *middle, d_in, dtype=torch.float64)
    r = torch.randn(batch, *middle, d_out, dtype=torch.float64)
    check_norms(layer, compute_linear_norm_sample, x, r)


@pytest.mark.parametrize(
    "seq, d_in, d_out",
    [
        (3, 8, 8),  # T (d_in + d_out) = 48 <= 64 = d_in d_out: Gram-matrix (ghost) path.
        (3, 4, 5),  # 27 > 20: fewer flops to materialise the gradient (T^2 = 9 <= 20 though).
        (12, 2, 3),  # 60 > 6: materialise.
        (1, 4, 4),  # T = 1: the rank-one product of norms.
    ],
)
def test_linear_norm_paths(seq, d_in, d_out):
    assert _gram_norm_is_cheaper(seq, d_in, d_out) == (seq * (d_in + d_out) <= d_in * d_out)
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out).double()
    x = torch.randn(3, seq, d_in, dtype=torch.float64)
    r = torch.randn(3, seq, d_out, dtype=torch.float64)
    check_norms(layer, compute_linear_norm_sample, x, r)


def test_gram_or_materialised_by_flops():
    """The GPT-2 benchmark's layers (batch 8, width 256): at sequence 128 every Conv1D and the
    4096-way head take the Gram matrices (2 T^2 (in + out) <= 2 T in out flops); at 512 the
    per-sample gradient is cheaper for all of them."""
    for d_in, d_out in [(256, 768), (256, 256), (256, 1024), (1024, 256), (256, 4096)]:
        assert _gram_norm_is_cheaper(128, d_in, d_out)
        assert not _gram_norm_is_cheaper(512, d_in, d_out)


def test_linear_norms_float32_and_frozen():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x, r = torch.randn(6, 10, 16), torch.randn(6, 10, 8)
    check_norms(layer, compute_linear_norm_sample, x, r, atol=1e-4, rtol=1e-4)
    layer.bias.requires_grad_(False)
    assert set(compute_linear_norm_sample(layer, [x], r)) == {layer.weight}


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_linear_norms_one_position_with_a_frozen_parameter(frozen):
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    getattr(layer, frozen).requires_grad_(False)
    x, r = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    check_norms(layer, compute_linear_norm_sample, x, r)
    assert set(compute_linear_norm_sample(layer, [x], r)) == {
        p for p in layer.parameters() if p.requires_grad
    }


def test_linear_zero_gradient_has_zero_norm():
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 3, 4)
    norms = compute_linear_norm_sample(layer, [x], torch.zeros(2, 3, 4))
    assert torch.equal(norms[layer.weight], torch.zeros(2))


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.lists(st.integers(1, 5), max_size=2),
    vocab=st.integers(1, 6),
    padding=st.booleans(),
    scale_grad_by_freq=st.booleans(),
    lean=st.booleans(),
    data=st.data(),
)
def test_embedding_norms(batch, seq, vocab, padding, scale_grad_by_freq, lean, data):
    """Small vocabularies force repeated indices, whose backprops add before the norm.
    ``lean``: the memory-lean path of large backprops (only repeated rows summed), forced."""
    import unittest.mock

    from opacus.grad_sample import embedding_norm_sample

    threshold = 0 if lean else embedding_norm_sample.SMALL_BACKPROPS
    torch.manual_seed(0)
    padding_idx = data.draw(st.integers(0, vocab - 1)) if padding else None
    layer = nn.Embedding(
        vocab, 3, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq
    ).double()
    idx = torch.randint(0, vocab, (batch, *seq))
    r = torch.randn(batch, *seq, 3, dtype=torch.float64)
    with unittest.mock.patch.object(embedding_norm_sample, "SMALL_BACKPROPS", threshold):
        check_norms(layer, compute_embedding_norm_sample, idx, r)


def test_embedding_norms_frozen():
    layer = nn.Embedding(4, 2)
    layer.weight.requires_grad_(False)
    idx = torch.zeros(2, 3, dtype=torch.long)
    assert compute_embedding_norm_sample(layer, [idx], torch.randn(2, 3, 2)) == {}

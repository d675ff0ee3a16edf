"""Per-sample gradients of DP recurrent layers (hooks on RNNLinear) vs the brute-force oracle."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.dp_rnn import compute_rnn_linear_grad_sample
from opacus.grad_sample.registry import GRAD_SAMPLERS
from opacus.layers import DPGRU, DPLSTM, DPRNN
from opacus.layers.dp_rnn import RNNLinear
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples, grad_samples_of

LAYERS = {"rnn": DPRNN, "gru": DPGRU, "lstm": DPLSTM}


def square_loss(out):
    return out.pow(2).sum()


class SequenceModel(nn.Module):
    """Recurrent layer, then a linear head on every output step."""

    def __init__(self, kind, batch_first, **kwargs):
        super().__init__()
        self.rnn = LAYERS[kind](3, 4, batch_first=batch_first, **kwargs)
        out = (kwargs.get("proj_size") or 4) * (2 if kwargs.get("bidirectional") else 1)
        self.head = nn.Linear(out, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class PackedModel(nn.Module):
    """Variable-length batch: pack (unsorted), run, and read out final states and summed outputs.

    Padding positions never reach the loss, so a sample's loss is the same alone or in a batch.
    """

    def __init__(self, kind, **kwargs):
        super().__init__()
        self.rnn = LAYERS[kind](3, 4, batch_first=True, **kwargs)
        self.directions = 2 if kwargs.get("bidirectional") else 1
        self.head = nn.Linear(4 * self.directions, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        h_n = state[0] if isinstance(state, tuple) else state
        last = torch.cat(list(h_n[-self.directions :]), dim=-1)
        summed = pad_packed_sequence(out, batch_first=True)[0].sum(dim=1)
        return self.head(last + summed)


def run_gsm(model, inputs, batch_first, loss_reduction, batch):
    gsm = GradSampleModule(model, batch_first=batch_first, loss_reduction=loss_reduction)
    loss = square_loss(gsm(*inputs))
    if loss_reduction == "mean":
        loss = loss / batch
    loss.backward()
    actual = grad_samples_of(gsm)
    gsm.remove_hooks()
    return actual


def test_registered():
    assert GRAD_SAMPLERS[RNNLinear] is compute_rnn_linear_grad_sample


def test_sampler_direct_one_step_and_sequence():
    torch.manual_seed(0)
    layer = RNNLinear(3, 2).double()
    for shape in ((4, 3), (4, 5, 3)):
        x = torch.randn(*shape, dtype=torch.float64)
        r = torch.randn(*shape[:-1], 2, dtype=torch.float64)
        got = compute_rnn_linear_grad_sample(layer, [x], r)
        expected = brute_force_grad_samples(
            layer, x, loss_fn=lambda out, t: (out * t).sum(), targets=r
        )
        assert_grad_samples_close(
            {"weight": got[layer.weight], "bias": got[layer.bias]}, expected, atol=1e-10
        )


@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(sorted(LAYERS)),
    batch_first=st.booleans(),
    loss_reduction=st.sampled_from(["sum", "mean"]),
    num_layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    bias=st.booleans(),
    N=st.integers(1, 3),
    T=st.integers(1, 4),
)
def test_matches_brute_force(
    kind, batch_first, loss_reduction, num_layers, bidirectional, bias, N, T
):
    torch.manual_seed(N * 10 + T)
    model = SequenceModel(
        kind, batch_first, num_layers=num_layers, bidirectional=bidirectional, bias=bias
    ).double()
    x = torch.randn((N, T, 3) if batch_first else (T, N, 3), dtype=torch.float64)
    batch_dim = 0 if batch_first else 1
    expected = brute_force_grad_samples(model, x, loss_fn=square_loss, batch_dim=batch_dim)
    actual = run_gsm(model, [x], batch_first, loss_reduction, N)
    assert_grad_samples_close(actual, expected, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("batch_first", [True, False])
def test_lstm_projection_matches_brute_force(batch_first):
    torch.manual_seed(0)
    model = SequenceModel(
        "lstm", batch_first, num_layers=2, bidirectional=True, proj_size=2
    ).double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)  # N=3, T=5 (or T=3, N=5)
    expected = brute_force_grad_samples(
        model, x, loss_fn=square_loss, batch_dim=0 if batch_first else 1
    )
    actual = run_gsm(model, [x], batch_first, "mean", x.shape[0 if batch_first else 1])
    assert "rnn.l1_reverse.hr.weight" in actual
    assert_grad_samples_close(actual, expected, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_unsorted_matches_brute_force(kind, loss_reduction, bidirectional):
    """Per-sample rows follow the caller's batch order, not the packing's sorted order."""
    torch.manual_seed(0)
    model = PackedModel(kind, num_layers=2, bidirectional=bidirectional).double()
    lengths = torch.tensor([2, 5, 1, 4])
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    for i, n in enumerate(lengths):
        x[i, n:] = 0.0
    expected = brute_force_grad_samples(model, [x, lengths], loss_fn=square_loss, batch_dim=[0, 0])
    actual = run_gsm(model, [x, lengths], True, loss_reduction, 4)
    assert_grad_samples_close(actual, expected, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_ghost_clipping_norms_match_brute_force(kind, batch_first):
    """Time steps reuse the same weights: their norms must come from summed gradients."""
    torch.manual_seed(0)
    model = SequenceModel(kind, batch_first, bidirectional=True).double()
    x = torch.randn((3, 4, 3) if batch_first else (4, 3, 3), dtype=torch.float64)
    expected = brute_force_grad_samples(
        model, x, loss_fn=square_loss, batch_dim=0 if batch_first else 1
    )
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=batch_first, loss_reduction="sum")
    square_loss(gsm(x)).backward()
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).norm(dim=0)
    torch.testing.assert_close(gsm.get_norm_sample(), norms)


@pytest.mark.parametrize("batch_first", [True, False])
def test_functorch_mode_matches_brute_force(batch_first):
    """The generic fallback must honour RNNLinear's always-first batch dimension too."""
    torch.manual_seed(0)
    model = SequenceModel("lstm", batch_first, num_layers=2, bidirectional=True).double()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    expected = brute_force_grad_samples(
        model, x, loss_fn=square_loss, batch_dim=0 if batch_first else 1
    )
    gsm = GradSampleModule(
        model, batch_first=batch_first, loss_reduction="sum", force_functorch=True
    )
    square_loss(gsm(x)).backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected, atol=1e-9, rtol=1e-7)

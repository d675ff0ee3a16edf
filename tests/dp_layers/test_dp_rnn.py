"""DPRNN / DPGRU / DPLSTM against the torch.nn recurrent layers (same weights)."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

from opacus.layers import DPGRU, DPLSTM, DPRNN
from opacus.layers.dp_rnn import (
    DPGRUCell,
    DPLSTMCell,
    DPRNNCell,
    RNNLinear,
    apply_permutation,
)

PAIRS = {"rnn": (nn.RNN, DPRNN), "gru": (nn.GRU, DPGRU), "lstm": (nn.LSTM, DPLSTM)}


def make_pair(kind, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    ref_cls, dp_cls = PAIRS[kind]
    ref = ref_cls(*args, **kwargs)
    dp = dp_cls(*args, **kwargs)
    dp.load_state_dict(ref.state_dict())
    return ref.eval(), dp.eval()


def assert_same(ref_out, dp_out):
    (ref_y, ref_h), (dp_y, dp_h) = ref_out, dp_out
    if isinstance(ref_y, nn.utils.rnn.PackedSequence):
        assert torch.equal(ref_y.batch_sizes, dp_y.batch_sizes)
        for a, b in (
            (ref_y.sorted_indices, dp_y.sorted_indices),
            (ref_y.unsorted_indices, dp_y.unsorted_indices),
        ):
            assert (a is None and b is None) or torch.equal(a, b)
        ref_y, dp_y = ref_y.data, dp_y.data
    torch.testing.assert_close(dp_y, ref_y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dp_h, ref_h, atol=1e-5, rtol=1e-4)


def initial_state(kind, n_states, batch, hidden, out_size, gen):
    h = torch.randn(n_states, batch, out_size, generator=gen)
    if kind == "lstm":
        return h, torch.randn(n_states, batch, hidden, generator=gen)
    return h


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(sorted(PAIRS)),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    T=st.integers(1, 4),
    N=st.integers(1, 3),
    with_state=st.booleans(),
    relu=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_torch_padded(
    kind, num_layers, bidirectional, batch_first, bias, T, N, with_state, relu, seed
):
    extra = {"nonlinearity": "relu"} if kind == "rnn" and relu else {}
    ref, dp = make_pair(
        kind,
        3,
        4,
        num_layers=num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        dropout=0.3,
        seed=seed,
        **extra,
    )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((N, T, 3) if batch_first else (T, N, 3), generator=gen)
    n_states = num_layers * (2 if bidirectional else 1)
    state = initial_state(kind, n_states, N, 4, 4, gen) if with_state else None
    assert_same(ref(x, state), dp(x, state))


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_torch_packed(kind, enforce_sorted, bidirectional, with_state):
    ref, dp = make_pair(kind, 3, 4, num_layers=2, bidirectional=bidirectional)
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 4, 2, 2, 1] if enforce_sorted else [2, 5, 1, 4, 2]
    packed = pack_sequence(
        [torch.randn(n, 3, generator=gen) for n in lengths], enforce_sorted=enforce_sorted
    )
    state = (
        initial_state(kind, 2 * (2 if bidirectional else 1), 5, 4, 4, gen) if with_state else None
    )
    assert_same(ref(packed, state), dp(packed, state))


@pytest.mark.parametrize("batch_first", [False, True])
def test_lstm_projection(batch_first):
    ref, dp = make_pair(
        "lstm", 3, 6, num_layers=2, bidirectional=True, proj_size=2, batch_first=batch_first
    )
    x = torch.randn(4, 5, 3)
    assert_same(ref(x), dp(x))
    gen = torch.Generator().manual_seed(0)
    state = (torch.randn(4, 4, 2, generator=gen), torch.randn(4, 4, 6, generator=gen))
    x = torch.randn(4, 4, 3)
    assert_same(ref(x, state), dp(x, state))
    packed = pack_sequence([torch.randn(n, 3) for n in (3, 5, 1)], enforce_sorted=False)
    assert_same(ref(packed), dp(packed))


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_unbatched_input(kind):
    ref, dp = make_pair(kind, 3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3)
    assert_same(ref(x), dp(x))
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(4, 4, generator=gen)
    state = (h, torch.randn(4, 4, generator=gen)) if kind == "lstm" else h
    assert_same(ref(x, state), dp(x, state))


def test_packed_with_batch_first_padding_source():
    ref, dp = make_pair("gru", 3, 4, batch_first=True)
    padded = torch.randn(3, 4, 3)
    packed = pack_padded_sequence(padded, [2, 4, 1], batch_first=True, enforce_sorted=False)
    assert_same(ref(packed), dp(packed))


def test_dropout_between_layers_in_training():
    _, dp = make_pair("gru", 3, 4, num_layers=2, dropout=0.5)
    dp.train()
    x = torch.randn(4, 2, 3)
    torch.manual_seed(0)
    a = dp(x)[0]
    torch.manual_seed(1)
    b = dp(x)[0]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_state_dict_names_and_aliases(kind):
    ref, dp = make_pair(kind, 3, 4, num_layers=2, bidirectional=True)
    # Saved under torch's names, in torch's order; the parameters keep their internal names.
    assert list(dp.state_dict()) == list(ref.state_dict())
    assert "l1_reverse.hh.weight" in dict(dp.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(getattr(dp, name), p)
    # nested load from a model with the torch layer
    outer_ref, outer_dp = nn.Sequential(ref), nn.Sequential(
        PAIRS[kind][1](3, 4, 2, bidirectional=True)
    )
    outer_dp.load_state_dict(outer_ref.state_dict())
    x = torch.randn(3, 2, 3)
    assert_same(outer_ref[0](x), outer_dp[0].eval()(x))
    # internal names load too; unknown names still fail in strict mode
    other = PAIRS[kind][1](3, 4, 2, bidirectional=True)
    other.load_state_dict({n: p.detach() for n, p in dp.named_parameters()})
    assert_same(ref(x), other.eval()(x))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict({**dp.state_dict(), "bogus": torch.zeros(1)})
    with pytest.raises(AttributeError):
        dp.weight_ih_l7


@pytest.mark.parametrize(
    "cell_cls, ref_cls",
    [(DPRNNCell, nn.RNNCell), (DPGRUCell, nn.GRUCell), (DPLSTMCell, nn.LSTMCell)],
)
def test_cells_match_torch_cells(cell_cls, ref_cls):
    torch.manual_seed(0)
    ref = ref_cls(3, 4)
    cell = cell_cls(3, 4, True)
    with torch.no_grad():
        cell.ih.weight.copy_(ref.weight_ih)
        cell.hh.weight.copy_(ref.weight_hh)
        cell.ih.bias.copy_(ref.bias_ih)
        cell.hh.bias.copy_(ref.bias_hh)
    x = torch.randn(5, 3)
    h = torch.randn(5, 4)
    hx = (h, torch.randn(5, 4)) if cell_cls is DPLSTMCell else h
    torch.testing.assert_close(cell(x, hx), ref(x, hx))
    torch.testing.assert_close(cell(x), ref(x))
    # batch_size_t: only the first rows of the state are still running (packed sequences)
    short = hx[0][:2] if isinstance(hx, tuple) else hx[:2]
    short_hx = (short, hx[1][:2]) if isinstance(hx, tuple) else short
    torch.testing.assert_close(cell(x[:2], hx, batch_size_t=2), ref(x[:2], short_hx))
    cell.set_max_batch_length(7)
    assert cell.ih.max_batch_len == 7 and cell.hh.max_batch_len == 7


def test_rnn_linear_and_permutation():
    assert RNNLinear._batch_dim_always_first is True
    assert isinstance(RNNLinear(2, 3), nn.Linear)
    t = torch.arange(6).view(3, 2)
    assert torch.equal(apply_permutation(t, 0, torch.tensor([2, 0, 1])), t[[2, 0, 1]])
    assert apply_permutation(t, 1, None) is t


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: DPGRU(3, 4, proj_size=2), "proj_size is only supported for LSTM"),
        (lambda: DPRNN(3, 4, proj_size=2), "proj_size is only supported for LSTM"),
        (lambda: DPLSTM(3, 4, proj_size=4), "smaller than hidden_size"),
        (lambda: DPLSTM(3, 4, dropout=1.5), "dropout"),
        (lambda: DPLSTM(3, 4, num_layers=0), "num_layers"),
        (lambda: DPRNN(3, 4, nonlinearity="gelu"), "nonlinearity"),
    ],
)
def test_bad_configuration(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_inputs():
    lstm = DPLSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match="input_size=3"):
        lstm(torch.randn(2, 2, 5))
    with pytest.raises(ValueError, match=r"h_0 has shape"):
        lstm(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(ValueError, match="tuple"):
        lstm(torch.randn(5, 2, 3), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="batch is on dim 1"):
        DPGRU(3, 4, batch_first=True)(torch.randn(2, 5, 3), torch.zeros(1, 5, 4))

"""Packed-sequence helpers against torch's own packing utilities."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

from opacus.utils.packed_sequences import (
    _gen_packed_data,
    compute_seq_lengths,
    packed_sequence_to_list,
    unpack_packedsequences,
)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5), enforce_sorted=st.booleans())
def test_round_trip_against_torch(lengths, enforce_sorted):
    if enforce_sorted:
        lengths = sorted(lengths, reverse=True)
    sequences = [torch.randn(n, 2) for n in lengths]
    packed = pack_sequence(sequences, enforce_sorted=enforce_sorted)
    _, torch_lengths = pad_packed_sequence(packed)
    assert compute_seq_lengths(packed.batch_sizes) == sorted(lengths, reverse=True)
    assert sorted(compute_seq_lengths(packed.batch_sizes)) == sorted(torch_lengths.tolist())
    for got, expected in zip(packed_sequence_to_list(packed), sequences):
        assert torch.equal(got, expected)
    in_packed_order = sorted(sequences, key=len, reverse=True)
    for got, expected in zip(unpack_packedsequences(packed), in_packed_order):
        assert got.shape == expected.shape


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("sorted_", [False, True])
def test_gen_packed_data(batch_first, sorted_):
    gen = torch.Generator().manual_seed(0)
    packed = _gen_packed_data(6, 5, 3, batch_first, sorted_, generator=gen)
    lengths = compute_seq_lengths(packed.batch_sizes)
    assert len(lengths) == 6 and max(lengths) == 5 and min(lengths) >= 1
    assert packed.data.shape == (sum(lengths), 3)
    assert (packed.sorted_indices is None) == sorted_

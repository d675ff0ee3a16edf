"""``opacus.utils.packed_sequences`` against torch's own packing and padding."""

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

lengths_st = st.lists(st.integers(1, 6), min_size=1, max_size=6)


def _sequences(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, generator=g) for n in lengths]


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st)
def test_compute_seq_lengths_matches_the_packing(lengths):
    packed = pack_sequence(_sequences(lengths), enforce_sorted=False)
    assert compute_seq_lengths(packed.batch_sizes) == sorted(lengths, reverse=True)
    _, padded_lengths = pad_packed_sequence(packed)  # torch's own lengths, original order
    assert sorted(padded_lengths.tolist(), reverse=True) == compute_seq_lengths(packed.batch_sizes)


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, sorted_input=st.booleans())
def test_unpack_and_list_recover_the_sequences(lengths, sorted_input):
    if sorted_input:
        lengths = sorted(lengths, reverse=True)
    sequences = _sequences(lengths)
    packed = pack_sequence(sequences, enforce_sorted=sorted_input)
    in_original_order = packed_sequence_to_list(packed)
    assert len(in_original_order) == len(sequences)
    for got, expected in zip(in_original_order, sequences):
        torch.testing.assert_close(got, expected)
    # unpack_packedsequences keeps the packed (length-descending, stable) order.
    order = packed.sorted_indices.tolist() if packed.sorted_indices is not None else None
    order = order or list(range(len(sequences)))
    for got, i in zip(unpack_packedsequences(packed), order):
        torch.testing.assert_close(got, sequences[i])


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 6),
    max_len=st.integers(1, 5),
    dim=st.integers(1, 4),
    batch_first=st.booleans(),
    sorted_=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_gen_packed_data(batch, max_len, dim, batch_first, sorted_, seed):
    packed = _gen_packed_data(
        batch, max_len, dim, batch_first, sorted_, generator=torch.Generator().manual_seed(seed)
    )
    lengths = compute_seq_lengths(packed.batch_sizes)
    assert len(lengths) == batch and max(lengths) == max_len and min(lengths) >= 1
    assert packed.data.shape == (sum(lengths), dim)
    if sorted_:
        assert packed.sorted_indices is None
    # Same seed, same data.
    again = _gen_packed_data(
        batch, max_len, dim, batch_first, sorted_, generator=torch.Generator().manual_seed(seed)
    )
    torch.testing.assert_close(packed.data, again.data)

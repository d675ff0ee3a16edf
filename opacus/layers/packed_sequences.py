"""Helpers for ``torch.nn.utils.rnn.PackedSequence`` inputs of the DP recurrent layers."""

from typing import List, Optional

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence


def compute_seq_lengths(batch_sizes: torch.Tensor) -> List[int]:
    """Sequence lengths, in packed (length-descending) order, from ``PackedSequence.batch_sizes``.

    ``batch_sizes[t]`` counts the sequences still running at step ``t``, so sequence ``i`` lasts
    for as many steps as have ``batch_sizes[t] > i``.

    Args:
        batch_sizes: the ``batch_sizes`` of a ``PackedSequence``.

    Returns:
        the lengths.
    """
    batch_sizes = torch.as_tensor(batch_sizes)
    max_batch_size = int(batch_sizes[0])
    positions = torch.arange(max_batch_size, device=batch_sizes.device)
    return (batch_sizes.unsqueeze(0) > positions.unsqueeze(1)).sum(dim=1).tolist()


def unpack_packedsequences(X: PackedSequence) -> List[torch.Tensor]:
    """The sequences of ``X`` as a list of ``(length_i, *)`` tensors, in packed (sorted) order.

    Args:
        X: the packed batch.

    Returns:
        the sequences.
    """
    lengths = compute_seq_lengths(X.batch_sizes)
    offsets = torch.cumsum(X.batch_sizes, dim=0) - X.batch_sizes  # start of each time step
    return [X.data[offsets[:length] + i] for i, length in enumerate(lengths)]


def packed_sequence_to_list(packed_seq: PackedSequence) -> List[torch.Tensor]:
    """The sequences of ``packed_seq`` as ``(length_i, *)`` tensors, in the original batch order."""
    sequences = unpack_packedsequences(packed_seq)
    if packed_seq.unsorted_indices is None:
        return sequences
    return [sequences[int(i)] for i in packed_seq.unsorted_indices]


def _gen_packed_data(
    minibatch_size: int,
    max_seq_length: int,
    input_dim: int,
    batch_first: bool,
    sorted_: bool = False,
    generator: Optional[torch.Generator] = None,
) -> PackedSequence:
    """A random ``PackedSequence`` of ``minibatch_size`` sequences of 1..max_seq_length steps.

    With ``sorted_`` the sequences are generated longest first and packed with
    ``enforce_sorted=True``; otherwise in random order with ``enforce_sorted=False``.
    ``batch_first`` only changes how the padded intermediate is laid out, as in user code.
    """
    lengths = torch.randint(1, max_seq_length + 1, (minibatch_size,), generator=generator)
    lengths[torch.randint(0, minibatch_size, (1,), generator=generator)] = max_seq_length
    if sorted_:
        lengths = lengths.sort(descending=True).values
    sequences = [torch.randn(int(n), input_dim, generator=generator) for n in lengths]
    if batch_first:
        padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
        return pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=sorted_)
    return pack_sequence(sequences, enforce_sorted=sorted_)

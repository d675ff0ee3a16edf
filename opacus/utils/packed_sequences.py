"""PackedSequence helpers of the DP RNNs, at their Opacus 1.6 path.

The code lives in ``opacus.layers.packed_sequences``, beside its user (``opacus.layers.dp_rnn``).
"""

from opacus.layers.packed_sequences import (  # noqa: F401 (re-exports)
    _gen_packed_data,
    compute_seq_lengths,
    packed_sequence_to_list,
    unpack_packedsequences,
)

__all__ = [
    "compute_seq_lengths",
    "packed_sequence_to_list",
    "unpack_packedsequences",
]

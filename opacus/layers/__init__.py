"""Layers re-implemented from hookable pieces so that DP-SGD gets per-sample gradients."""

from opacus.layers.dp_multihead_attention import DPMultiheadAttention, SequenceBias
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
from opacus.layers.param_rename import RenameParamsMixin

__all__ = [
    "DPRNN",
    "DPGRU",
    "DPLSTM",
    "DPMultiheadAttention",
    "RenameParamsMixin",
    "SequenceBias",
]

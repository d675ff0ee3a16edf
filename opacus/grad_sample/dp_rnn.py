"""Per-sample gradients of ``RNNLinear``, the linear maps inside the DP recurrent layers.

An ``RNNLinear`` is an ordinary affine map ``y = x W^T + b`` whose batch is always on dim 0; the
hidden-to-hidden map is called once per time step; the hooks join those calls along a sequence
dim (zero rows for finished packed sequences) and call this function once per backward:
``sum_t b_{i,t} a_{i,t}^T`` and ``sum_t b_{i,t}`` over whatever dims lie between batch and
features.
"""

from typing import Dict, List

import torch
import torch.nn as nn

from opacus.grad_sample.registry import SUMS_OVER_SEQUENCE_ATTR, register_grad_sampler
from opacus.layers.dp_rnn import RNNLinear


@register_grad_sampler(RNNLinear)
def compute_rnn_linear_grad_sample(
    layer: RNNLinear, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of one call of an ``RNNLinear``.

    Args:
        layer: the layer.
        activations: ``[x]``, ``x`` of shape ``(B, in_features)`` or ``(B, ..., in_features)``.
        backprops: gradient w.r.t. the output, ``(B, out_features)`` or ``(B, ..., out_features)``.

    Returns:
        ``{weight: (B, out, in), bias: (B, out)}`` for the parameters that require grad.
    """
    a = activations[0]
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    b = backprops.reshape(backprops.shape[0], -1, backprops.shape[-1])
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.bmm(b.transpose(1, 2), a)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = b.sum(dim=1)
    return ret


setattr(compute_rnn_linear_grad_sample, SUMS_OVER_SEQUENCE_ATTR, True)

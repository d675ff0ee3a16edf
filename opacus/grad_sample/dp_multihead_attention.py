"""Per-sample gradients of ``SequenceBias`` (the ``bias_k``/``bias_v`` of DP attention).

``SequenceBias`` appends its vector as the last step of the sequence, so sample ``i``'s gradient
is the gradient of the output at that appended position. With the batch on dim 0 (the hooks
put it there) the sequence is dim 1, whatever layout the layer itself was built for.
"""

from typing import Dict, List

import torch
import torch.nn as nn

from opacus.grad_sample.registry import register_grad_sampler, register_norm_sampler
from opacus.layers.dp_multihead_attention import SequenceBias


@register_grad_sampler(SequenceBias)
def compute_sequence_bias_grad_sample(
    layer: SequenceBias, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ``SequenceBias``.

    Args:
        layer: the layer.
        activations: ``[x]`` (unused: the output is affine in the bias with unit slope).
        backprops: gradient w.r.t. the output, ``(B, L + 1, E)`` (batch first).

    Returns:
        ``{bias: (B, E)}`` if the bias requires grad.
    """
    if not layer.bias.requires_grad:
        return {}
    return {layer.bias: backprops[:, -1]}


@register_norm_sampler(SequenceBias)
def compute_sequence_bias_norm_sample(
    layer: SequenceBias, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a ``SequenceBias``: ``||backprops[i, -1]||``."""
    if not layer.bias.requires_grad:
        return {}
    return {layer.bias: backprops[:, -1].norm(2, dim=-1)}

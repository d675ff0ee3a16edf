"""Per-sample gradients of ``nn.GroupNorm``.

``y[:, c] = x_hat[:, c] * weight[c] + bias[c]`` with ``x_hat`` normalised per (sample, group)
(Wu & He 2018): the gradient of sample ``i``'s loss is ``x_hat_i * b_i`` (weight) and ``b_i``
(bias), summed over the spatial dims.
"""

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from opacus.grad_sample.registry import register_grad_sampler


def _lift(x: torch.Tensor, backprops: torch.Tensor, layer: nn.Module):
    """``x`` and ``backprops`` in the widest of their dtypes and the layer's parameter dtype."""
    dtype = torch.promote_types(x.dtype, backprops.dtype)
    for p in layer.parameters(recurse=False):
        dtype = torch.promote_types(dtype, p.dtype)
    return x.to(dtype), backprops.to(dtype)


@register_grad_sampler(nn.GroupNorm)
def compute_group_norm_grad_sample(
    layer: nn.GroupNorm, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an ``nn.GroupNorm``.

    Args:
        layer: the layer (``affine=True``; without affine there is nothing to train).
        activations: ``[x]`` with ``x`` of shape ``(B, C, *spatial)``.
        backprops: gradient w.r.t. the output, same shape as ``x``.

    Returns:
        ``{weight: (B, C), bias: (B, C)}`` for the parameters that exist and require grad.
    """
    # Under autocast the input may be bf16 while the layer (and its gradient) is float32.
    x, backprops = _lift(activations[0], backprops, layer)
    spatial = list(range(2, x.dim()))
    ret = {}
    if layer.weight is not None and layer.weight.requires_grad:
        x_hat = F.group_norm(x, layer.num_groups, eps=layer.eps)
        ret[layer.weight] = (x_hat * backprops).sum(dim=spatial) if spatial else x_hat * backprops
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=spatial) if spatial else backprops
    return ret

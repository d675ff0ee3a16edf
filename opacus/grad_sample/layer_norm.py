"""Per-sample gradients of ``nn.LayerNorm``.

``y = x_hat * weight + bias`` with ``x_hat`` the input normalised over ``normalized_shape``; so the
gradient of sample ``i``'s loss is ``sum x_hat_i * b_i`` (weight) and ``sum b_i`` (bias), summed
over every dim between the batch and the normalised ones.
"""

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from opacus.grad_sample.registry import register_grad_sampler
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n

__all__ = ["compute_layer_norm_grad_sample", "sum_over_all_but_batch_and_last_n"]


def _lift(x: torch.Tensor, backprops: torch.Tensor, layer: nn.Module):
    """``x`` and ``backprops`` in the widest of their dtypes and the layer's parameter dtype."""
    dtype = torch.promote_types(x.dtype, backprops.dtype)
    for p in layer.parameters(recurse=False):
        dtype = torch.promote_types(dtype, p.dtype)
    return x.to(dtype), backprops.to(dtype)


@register_grad_sampler(nn.LayerNorm)
def compute_layer_norm_grad_sample(
    layer: nn.LayerNorm, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an ``nn.LayerNorm``.

    Args:
        layer: the layer (``elementwise_affine``, with or without bias).
        activations: ``[x]`` with ``x`` of shape ``(B, ..., *normalized_shape)``.
        backprops: gradient w.r.t. the output, same shape as ``x``.

    Returns:
        ``{weight: (B, *normalized_shape), bias: (B, *normalized_shape)}`` for the parameters
        that exist and require grad.
    """
    # Under autocast the input may be bf16 while the layer (and its gradient) is float32.
    x, backprops = _lift(activations[0], backprops, layer)
    n_dims = len(layer.normalized_shape)
    ret = {}
    if layer.weight is not None and layer.weight.requires_grad:
        x_hat = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
        # In place: x_hat is ours, and a fresh product would cost a page fault per 4 KiB.
        ret[layer.weight] = sum_over_all_but_batch_and_last_n(x_hat.mul_(backprops), n_dims)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = sum_over_all_but_batch_and_last_n(backprops, n_dims)
    return ret

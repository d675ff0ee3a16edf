"""Per-sample gradients (and ghost norms, clipped sums) of ``nn.RMSNorm``.

``y = x / rms(x) * weight``: the gradient of sample ``i``'s loss is ``sum (x_i / rms(x_i)) * b_i``
summed over every dim between the batch and the normalised ones (Zhang & Sennrich 2019).  It is
as small as the weight, so the norm sampler takes its norms and the clipped sum contracts it.

``nn.RMSNorm`` exists from torch 2.4 on; with an older torch nothing is registered.
"""

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from opacus.grad_sample.registry import (
    register_clipped_sum_sampler,
    register_grad_sampler,
    register_norm_sampler,
)
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n

__all__ = [
    "compute_rms_norm_clipped_sum",
    "compute_rms_norm_grad_sample",
    "compute_rms_norm_norm_sample",
    "sum_over_all_but_batch_and_last_n",
]


def _lift(x: torch.Tensor, backprops: torch.Tensor, layer: nn.Module):
    """``x`` and ``backprops`` in the widest of their dtypes and the layer's parameter dtype."""
    dtype = torch.promote_types(x.dtype, backprops.dtype)
    for p in layer.parameters(recurse=False):
        dtype = torch.promote_types(dtype, p.dtype)
    return x.to(dtype), backprops.to(dtype)


def compute_rms_norm_grad_sample(
    layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an ``nn.RMSNorm``.

    Args:
        layer: the layer (``eps=None`` means ``torch.finfo(x.dtype).eps``, as in ``nn.RMSNorm``).
        activations: ``[x]`` with ``x`` of shape ``(B, ..., *normalized_shape)``.
        backprops: gradient w.r.t. the output, same shape as ``x``.

    Returns:
        ``{weight: (B, *normalized_shape)}`` if the weight exists and requires grad.
    """
    if layer.weight is None or not layer.weight.requires_grad:
        return {}
    # Under autocast the input may be bf16 while the layer (and its gradient) is float32.
    x, backprops = _lift(activations[0], backprops, layer)
    x_hat = F.rms_norm(x, layer.normalized_shape, eps=layer.eps)
    n_dims = len(layer.normalized_shape)
    return {layer.weight: sum_over_all_but_batch_and_last_n(x_hat * backprops, n_dims)}


def compute_rms_norm_norm_sample(
    layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms ``{weight: (B,)}`` of an ``nn.RMSNorm`` (ghost clipping)."""
    return {
        p: torch.linalg.vector_norm(
            g.reshape(g.shape[0], -1), dim=1, dtype=torch.promote_types(g.dtype, torch.float32)
        )
        for p, g in compute_rms_norm_grad_sample(layer, activations, backprops).items()
    }


def compute_rms_norm_clipped_sum(
    layer: nn.Module,
    activations: List[torch.Tensor],
    backprops: torch.Tensor,
    weights: torch.Tensor,
) -> Dict[nn.Parameter, torch.Tensor]:
    """``{weight: sum_i weights_i * g_i}`` of an ``nn.RMSNorm`` (shape ``normalized_shape``)."""
    return {
        p: torch.tensordot(weights.to(g.dtype), g, dims=1)
        for p, g in compute_rms_norm_grad_sample(layer, activations, backprops).items()
    }


if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register_grad_sampler(nn.RMSNorm)(compute_rms_norm_grad_sample)
    register_norm_sampler(nn.RMSNorm)(compute_rms_norm_norm_sample)
    register_clipped_sum_sampler(nn.RMSNorm)(compute_rms_norm_clipped_sum)

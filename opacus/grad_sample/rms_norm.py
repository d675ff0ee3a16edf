"""Per-sample gradients of ``nn.RMSNorm``.

``y = x / rms(x) * weight``: the gradient of sample ``i``'s loss is ``sum (x_i / rms(x_i)) * b_i``
summed over every dim between the batch and the normalised ones (Zhang & Sennrich 2019).
"""

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from opacus.grad_sample.registry import register_grad_sampler
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n

__all__ = ["compute_rms_norm_grad_sample", "sum_over_all_but_batch_and_last_n"]


def _lift(x: torch.Tensor, backprops: torch.Tensor, layer: nn.Module):
    """``x`` and ``backprops`` in the widest of their dtypes and the layer's parameter dtype."""
    dtype = torch.promote_types(x.dtype, backprops.dtype)
    for p in layer.parameters(recurse=False):
        dtype = torch.promote_types(dtype, p.dtype)
    return x.to(dtype), backprops.to(dtype)


@register_grad_sampler(nn.RMSNorm)
def compute_rms_norm_grad_sample(
    layer: nn.RMSNorm, activations: List[torch.Tensor], backprops: torch.Tensor
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

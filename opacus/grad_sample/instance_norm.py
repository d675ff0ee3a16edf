"""Per-sample gradients of ``nn.InstanceNorm1d/2d/3d`` (``affine=True``).

``y[:, c] = x_hat[:, c] * weight[c] + bias[c]`` with ``x_hat`` normalised per (sample, channel)
(Ulyanov et al. 2016): the gradient of sample ``i``'s loss is ``x_hat_i * b_i`` (weight) and
``b_i`` (bias), summed over the spatial dims.
"""

from typing import Dict, List, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from opacus.grad_sample.registry import register_grad_sampler

InstanceNormNd = Union[nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d]
_BATCHED_DIMS = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}


def _lift(x: torch.Tensor, backprops: torch.Tensor, layer: nn.Module):
    """``x`` and ``backprops`` in the widest of their dtypes and the layer's parameter dtype."""
    dtype = torch.promote_types(x.dtype, backprops.dtype)
    for p in layer.parameters(recurse=False):
        dtype = torch.promote_types(dtype, p.dtype)
    return x.to(dtype), backprops.to(dtype)


def _normalised(layer: InstanceNormNd, x: torch.Tensor) -> torch.Tensor:
    if layer.training or not layer.track_running_stats:
        # Input statistics; no running buffers passed, so the forward's update is not repeated.
        return F.instance_norm(x, eps=layer.eps)
    return F.instance_norm(
        x, layer.running_mean, layer.running_var, use_input_stats=False, eps=layer.eps
    )


@register_grad_sampler([nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d])
def compute_instance_norm_grad_sample(
    layer: InstanceNormNd, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an ``nn.InstanceNorm{1,2,3}d`` with ``affine=True``.

    Args:
        layer: the layer. In eval mode with ``track_running_stats`` the running statistics
            normalise, as in the layer's forward.
        activations: ``[x]`` with ``x`` of shape ``(B, C, *spatial)`` (batched input only).
        backprops: gradient w.r.t. the output, same shape as ``x``.

    Returns:
        ``{weight: (B, C), bias: (B, C)}`` for the parameters that exist and require grad.

    Raises:
        ValueError: the input is not batched (too few dimensions for the layer).
    """
    x = activations[0]
    expected = _BATCHED_DIMS[type(layer)] if type(layer) in _BATCHED_DIMS else x.dim()
    if x.dim() != expected:
        raise ValueError(
            f"{type(layer).__name__} grad sampler: expected a batched input of {expected} dims "
            f"(B, C, *spatial), got shape {tuple(x.shape)}; add a batch dimension"
        )
    # Under autocast the input may be bf16 while the layer (and its gradient) is float32.
    x, backprops = _lift(x, backprops, layer)
    spatial = list(range(2, x.dim()))
    ret = {}
    if layer.weight is not None and layer.weight.requires_grad:
        ret[layer.weight] = (_normalised(layer, x) * backprops).sum(dim=spatial)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=spatial)
    return ret

"""Per-sample gradients of a BatchNorm layer in ``eval()`` mode (running statistics).

In training mode a BatchNorm normalises each sample with statistics of the whole batch, so one
sample's output depends on the others: per-sample gradients are not defined, and the running
statistics are updated from the private batch without noise.  The hooks refuse that.  In eval
mode (with running statistics) the layer is the per-channel affine map
``y = (x - mean) / sqrt(var + eps) * weight + bias`` with fixed, public statistics, whose
per-sample gradients are ``sum_s g_s x_hat_s`` (weight) and ``sum_s g_s`` (bias) over the
positions ``s`` of the sample.

Not registered in ``registry.GRAD_SAMPLERS``: a BatchNorm is supported only while it uses its
running statistics, which the hooks check at every forward pass.
"""

from typing import Dict, List

import torch
import torch.nn as nn

__all__ = ["compute_eval_batch_norm_grad_sample", "is_batch_norm", "uses_batch_statistics"]


def is_batch_norm(module: nn.Module) -> bool:
    """True for ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and their subclasses."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def uses_batch_statistics(bn: nn.Module) -> bool:
    """True if ``bn``'s next forward normalises with the batch's statistics (as torch decides:
    in training mode, or without running statistics)."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def compute_eval_batch_norm_grad_sample(
    layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a BatchNorm that normalises with its running statistics.

    Args:
        layer: the BatchNorm (in eval mode, with running statistics).
        activations: ``[x]``, ``x`` of shape ``(B, C, *)``.
        backprops: gradient w.r.t. the output, same shape as ``x``.

    Returns:
        ``{weight: (B, C), bias: (B, C)}`` for the affine parameters that require grad.
    """
    if uses_batch_statistics(layer):
        raise RuntimeError(
            f"{type(layer).__name__} normalised with batch statistics (training mode or no "
            "running statistics): its per-sample gradients are not defined. Call .eval() on it "
            "(after model.train()) or replace it with GroupNorm (ModuleValidator.fix)."
        )
    x = activations[0]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    g = backprops.reshape(backprops.shape[0], backprops.shape[1], -1)
    out = {}
    if layer.weight is not None and layer.weight.requires_grad:
        inv_std = torch.rsqrt(layer.running_var.to(x.dtype) + layer.eps).reshape(shape)
        x_hat = (x - layer.running_mean.to(x.dtype).reshape(shape)) * inv_std
        out[layer.weight] = (g * x_hat.reshape(g.shape)).sum(dim=2)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=2)
    return out

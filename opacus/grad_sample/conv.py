"""Per-sample gradients of ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

A convolution is a matrix product with the unfolded input (im2col): ``y = W unfold(x)``, so the
gradient of sample ``i``'s loss is ``b_i unfold(x_i)^T`` (Goodfellow 2015, "Efficient per-example
gradient computations"; Rochette et al. 2019, "Efficient per-example gradient computations in
convolutional neural networks").  Grouped convolutions contract each group separately.
"""

from typing import Dict, List, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from opacus.grad_sample.buffers import reusable_empty
from opacus.grad_sample.registry import register_grad_sampler
from opacus.utils.tensor_utils import explicit_padding, unfold2d, unfold3d

__all__ = [
    "compute_conv_grad_sample",
    "convolution2d_backward_as_a_convolution",
    "unfold2d",
    "unfold3d",
]

ConvNd = Union[nn.Conv1d, nn.Conv2d, nn.Conv3d]


def _padded_input(layer: ConvNd, x: torch.Tensor) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """Apply the padding the layer applies; return the input and the zero-padding still owed.

    Non-zero padding modes pad with ``F.pad`` as ``nn.Conv*d`` does; zero padding is left to the
    unfolding when it is symmetric (cheaper), and applied here when ``"same"`` makes it uneven.
    """
    pads = explicit_padding(layer.padding, layer.kernel_size, layer.dilation)
    if layer.padding_mode != "zeros":
        flat = [p for pair in reversed(pads) for p in pair]
        return F.pad(x, flat, mode=layer.padding_mode), [(0, 0)] * len(pads)
    if any(lo != hi for lo, hi in pads):
        flat = [p for pair in reversed(pads) for p in pair]
        return F.pad(x, flat), [(0, 0)] * len(pads)
    return x, pads


def _check_input(layer: ConvNd, x: torch.Tensor) -> int:
    n = len(layer.kernel_size)
    if x.dim() != n + 2:
        raise ValueError(
            f"{type(layer).__name__} grad sampler: expected a batched input of {n + 2} dims "
            f"(B, C, *spatial), got shape {tuple(x.shape)}; add a batch dimension"
        )
    return n


def _windows2d(layer: ConvNd, x: torch.Tensor, padding, kernel, stride, dilation) -> torch.Tensor:
    """im2col of ``x (B, C, H, W)`` as ``(B, C * kh * kw, L)``, written into a pooled buffer.

    The windows are a strided view of the (zero-padded) input, copied once into a buffer reused
    across steps: ~10x cheaper on CPU than ``F.unfold``'s fresh allocation (page faults, see
    ``buffers``).  Same layout as ``F.unfold``: channel-major, then kernel row, kernel column.
    """
    ph, pw = padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    # Each window spans d * (k - 1) + 1 inputs; keep every d-th of them.
    win = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    win = win[..., ::dh, ::dw]  # (B, C, H_out, W_out, kh, kw)
    batch, channels, h_out, w_out = win.shape[:4]
    out = reusable_empty(
        layer, "im2col", (batch, channels, kh, kw, h_out, w_out), dtype=x.dtype, device=x.device
    )
    out.copy_(win.permute(0, 1, 4, 5, 2, 3))
    return out.view(batch, channels * kh * kw, h_out * w_out)


@register_grad_sampler([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def compute_conv_grad_sample(
    layer: ConvNd, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a convolution via unfold + einsum.

    Args:
        layer: an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (any stride, padding incl.
            ``"same"``/``"valid"``, dilation, groups and padding mode).
        activations: ``[x]`` with ``x`` of shape ``(B, C_in, *spatial)``.
        backprops: gradient w.r.t. the output, ``(B, C_out, *spatial_out)``.

    Returns:
        ``{weight: (B, *weight.shape), bias: (B, C_out)}`` for the parameters that require grad.
    """
    x = activations[0]
    n = _check_input(layer, x)
    batch = x.shape[0]
    # Under autocast the captured input and the output gradient can differ in precision.
    dtype = torch.promote_types(x.dtype, backprops.dtype)
    x, backprops = x.to(dtype), backprops.to(dtype)
    ret = {}
    if layer.weight.requires_grad:
        x, pads = _padded_input(layer, x)
        padding = tuple(lo for lo, _ in pads)
        if n == 1:
            # A 1-D convolution is a 2-D one over a height-1 image.
            cols = _windows2d(
                layer,
                x.unsqueeze(-2),
                (0, padding[0]),
                (1, layer.kernel_size[0]),
                (1, layer.stride[0]),
                (1, layer.dilation[0]),
            )
        elif n == 2:
            cols = _windows2d(layer, x, padding, layer.kernel_size, layer.stride, layer.dilation)
        else:
            cols = unfold3d(
                x,
                kernel_size=layer.kernel_size,
                padding=padding,
                stride=layer.stride,
                dilation=layer.dilation,
            )
        groups = layer.groups
        # One (O/g, L) @ (L, K) product per (sample, group), as a single bmm.
        b = backprops.reshape(batch * groups, layer.out_channels // groups, -1)
        cols = cols.reshape(batch * groups, -1, cols.shape[-1])
        out = reusable_empty(
            layer,
            "weight",
            (batch * groups, b.shape[1], cols.shape[1]),
            dtype=dtype,
            device=x.device,
        )
        torch.bmm(b, cols.transpose(1, 2), out=out)
        ret[layer.weight] = out.view(batch, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(batch, layer.out_channels, -1).sum(dim=-1)
    return ret


def convolution2d_backward_as_a_convolution(
    layer: nn.Conv2d, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an ``nn.Conv2d`` computed as one grouped convolution.

    ``dL_i/dW[o, c, u, v] = sum_{y, x} b_i[o, y, x] x_i[c, u*d + y*s, v*d + x*s]``: a convolution
    of the input by the backprops with stride and dilation swapped, one group per (sample, conv
    group).  Same result as :func:`compute_conv_grad_sample`, without the im2col buffer.
    """
    x = activations[0]
    if _check_input(layer, x) != 2:
        raise ValueError(
            f"convolution2d_backward_as_a_convolution: {type(layer).__name__} is not a Conv2d; "
            "use compute_conv_grad_sample"
        )
    batch = x.shape[0]
    groups = layer.groups
    in_per_group = layer.in_channels // groups
    ret = {}
    if layer.weight.requires_grad:
        x, pads = _padded_input(layer, x)
        x = F.pad(x, [p for pair in reversed(pads) for p in pair]) if any(map(any, pads)) else x
        # Input channels (sample, group) become conv groups; the in-group channel is the batch.
        inp = x.reshape(batch, groups, in_per_group, *x.shape[2:])
        inp = inp.permute(2, 0, 1, 3, 4).reshape(in_per_group, batch * groups, *x.shape[2:])
        kernel = backprops.reshape(batch * layer.out_channels, 1, *backprops.shape[2:])
        out = F.conv2d(
            inp, kernel, stride=layer.dilation, dilation=layer.stride, groups=batch * groups
        )
        kh, kw = layer.kernel_size
        # Positions past the last tap read input the forward never reached: drop them.
        out = out[:, :, :kh, :kw]
        out = out.reshape(in_per_group, batch, layer.out_channels, kh, kw)
        ret[layer.weight] = out.permute(1, 2, 0, 3, 4).contiguous()
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(batch, layer.out_channels, -1).sum(dim=-1)
    return ret

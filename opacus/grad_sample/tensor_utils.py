"""Tensor helpers shared by the per-sample gradient samplers: reductions, unfolding, norms.

``unfold2d`` / ``unfold3d`` turn a convolution into a matrix product (im2col): the output of a
convolution is ``W @ unfold(x)``, so the per-sample weight gradient is ``backprops @ unfold(x)^T``
(Goodfellow 2015, "Efficient per-example gradient computations").
"""

from typing import Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

IntOrTuple = Union[int, Tuple[int, ...]]


def sum_over_all_but_batch_and_last_n(tensor: torch.Tensor, n_dims: int) -> torch.Tensor:
    """Sum ``tensor`` over every dim except the first (batch) and the last ``n_dims``.

    Example: ``(B, T, H, W)`` with ``n_dims=2`` gives ``(B, H, W)``.

    Args:
        tensor: a tensor with the batch on dim 0.
        n_dims: how many trailing dims to keep.

    Returns:
        the summed tensor.

    Raises:
        ValueError: ``n_dims`` is negative or too large.
    """
    if n_dims < 0:
        raise ValueError(f"sum_over_all_but_batch_and_last_n: n_dims={n_dims} must be >= 0")
    if tensor.dim() < n_dims + 1:
        raise ValueError(
            f"sum_over_all_but_batch_and_last_n: tensor of shape {tuple(tensor.shape)} has no "
            f"batch dim in front of its last {n_dims} dims"
        )
    if tensor.dim() == n_dims + 1:
        return tensor
    return tensor.sum(dim=list(range(1, tensor.dim() - n_dims)))


def _tuple(value: IntOrTuple, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name}={value} must be an int or a tuple of {n} ints")
    return value


def explicit_padding(
    padding: Union[str, IntOrTuple],
    kernel_size: Sequence[int],
    dilation: Sequence[int],
) -> List[Tuple[int, int]]:
    """``(before, after)`` zero-padding per spatial dim, resolving ``"same"`` and ``"valid"``.

    ``"same"`` pads ``dilation * (kernel - 1)`` in total, the extra element (even kernels) after,
    exactly as ``torch.nn.functional.conv*d`` and ``nn.Conv*d`` do.
    """
    n = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * n
        if padding == "same":
            pads = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return pads
        raise ValueError(f"padding={padding!r}: expected 'same', 'valid', an int or a tuple")
    return [(p, p) for p in _tuple(padding, n, "padding")]


def _pad_input(x: torch.Tensor, pads: List[Tuple[int, int]]) -> torch.Tensor:
    # F.pad lists pads from the last dim backwards.
    flat = [p for pair in reversed(pads) for p in pair]
    return F.pad(x, flat) if any(flat) else x


def unfold2d(
    input,
    *,
    kernel_size: Tuple[int, int],
    padding: Union[str, Tuple[int, int]],
    stride: Tuple[int, int],
    dilation: Tuple[int, int],
):
    """im2col of a 4-D ``(B, C, H, W)`` tensor: ``(B, C * kh * kw, L)`` like ``F.unfold``.

    Unlike ``F.unfold`` it accepts ``padding="same"`` / ``"valid"`` (asymmetric for even kernels).

    Args:
        input: a ``(B, C, H, W)`` tensor.
        kernel_size: ``(kh, kw)``.
        padding: ``(ph, pw)``, ``"same"`` or ``"valid"``.
        stride: ``(sh, sw)``.
        dilation: ``(dh, dw)``.

    Raises:
        ValueError: ``input`` is not 4-d, or an argument is malformed.
    """
    if input.dim() != 4:
        raise ValueError(
            f"unfold2d: expected a (B, C, H, W) tensor, got shape {tuple(input.shape)}"
        )
    kernel_size = _tuple(kernel_size, 2, "kernel_size")
    stride = _tuple(stride, 2, "stride")
    dilation = _tuple(dilation, 2, "dilation")
    pads = explicit_padding(padding, kernel_size, dilation)
    if all(lo == hi for lo, hi in pads):
        sym = tuple(lo for lo, _ in pads)
    else:
        input, sym = _pad_input(input, pads), (0, 0)
    return F.unfold(input, kernel_size, dilation=dilation, padding=sym, stride=stride)


def unfold3d(
    tensor: torch.Tensor,
    *,
    kernel_size: Union[int, Tuple[int, int, int]],
    padding: Union[int, Tuple[int, int, int]] = 0,
    stride: Union[int, Tuple[int, int, int]] = 1,
    dilation: Union[int, Tuple[int, int, int]] = 1,
):
    """im2col of a 5-D ``(B, C, D, H, W)`` tensor: ``(B, C * kd * kh * kw, L)``.

    Rows are ordered channel-major then kernel ``(d, h, w)``, columns are output positions in
    ``(D_out, H_out, W_out)`` row-major order: the 3-D analogue of ``F.unfold``. ``padding`` may
    also be ``"same"`` or ``"valid"``.

    Args:
        tensor: a ``(B, C, D, H, W)`` tensor.
        kernel_size: an int or ``(kd, kh, kw)``.
        padding: an int, a triple, ``"same"`` or ``"valid"``.
        stride: an int or a triple.
        dilation: an int or a triple.

    Raises:
        ValueError: ``tensor`` is not 5-d, or an argument is malformed.
    """
    if tensor.dim() != 5:
        raise ValueError(
            f"unfold3d: expected a (B, C, D, H, W) tensor, got shape {tuple(tensor.shape)}"
        )
    kernel_size = _tuple(kernel_size, 3, "kernel_size")
    stride = _tuple(stride, 3, "stride")
    dilation = _tuple(dilation, 3, "dilation")
    tensor = _pad_input(tensor, explicit_padding(padding, kernel_size, dilation))
    batch, channels = tensor.shape[:2]
    windows = tensor
    for dim, (k, s, d) in enumerate(zip(kernel_size, stride, dilation), start=2):
        # A sliding window spanning the dilated kernel; a strided view, no copy yet.
        windows = windows.unfold(dim, d * (k - 1) + 1, s)
    # (B, C, Do, Ho, Wo, dkd, dkh, dkw): keep the taps that the dilated kernel actually reads.
    windows = windows[..., :: dilation[0], :: dilation[1], :: dilation[2]]
    windows = windows.permute(0, 1, 5, 6, 7, 2, 3, 4)
    return windows.reshape(batch, channels * int(np.prod(kernel_size)), -1)


def filter_dilated_rows(
    tensor: torch.Tensor,
    dilation: Tuple[int, int, int],
    dilated_kernel_size: Tuple[int, int, int],
    kernel_size: Tuple[int, int, int],
):
    """Drop the rows of a 3-D im2col that fall in the holes of a dilated kernel.

    ``tensor`` is ``(B, C * prod(dilated_kernel_size), L)``, the unfolding with a dense kernel of
    the dilated size ``d * (k - 1) + 1``; the result is ``(B, C * prod(kernel_size), L)``, the
    unfolding with the dilated kernel.

    Args:
        tensor: the dense unfolding ``(B, C * prod(dilated_kernel_size), L)``.
        dilation: the dilation ``(d, h, w)``.
        dilated_kernel_size: ``dilation * (kernel_size - 1) + 1``, per dimension.
        kernel_size: the kernel size ``(d, h, w)``.

    Raises:
        ValueError: the sizes are inconsistent with ``tensor``.
    """
    dilation = _tuple(dilation, 3, "dilation")
    dilated_kernel_size = _tuple(dilated_kernel_size, 3, "dilated_kernel_size")
    kernel_size = _tuple(kernel_size, 3, "kernel_size")
    for k, d, dk in zip(kernel_size, dilation, dilated_kernel_size):
        if dk != d * (k - 1) + 1:
            raise ValueError(
                f"filter_dilated_rows: dilated_kernel_size={dilated_kernel_size} is not "
                f"dilation * (kernel_size - 1) + 1 for dilation={dilation}, "
                f"kernel_size={kernel_size}"
            )
    batch, rows, length = tensor.shape
    per_channel = int(np.prod(dilated_kernel_size))
    if rows % per_channel:
        raise ValueError(
            f"filter_dilated_rows: {rows} rows is not a multiple of prod({dilated_kernel_size})"
        )
    grid = tensor.reshape(batch, rows // per_channel, *dilated_kernel_size, length)
    grid = grid[:, :, :: dilation[0], :: dilation[1], :: dilation[2]]
    return grid.reshape(batch, -1, length)


def calc_sample_norms_one_layer(param: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norms ``(B,)`` of one per-sample gradient tensor ``(B, *shape)``.

    Args:
        param: per-sample gradients ``(B, *shape)``.

    Returns:
        the norms ``(B,)``.
    """
    return param.reshape(param.shape[0], -1).norm(2, dim=-1)


def calc_sample_norms(
    named_params: Iterator[Tuple[str, torch.Tensor]], *, flat: bool = True
) -> List[torch.Tensor]:
    """Per-sample L2 norms of per-sample gradients ``(name, (B, *shape))``.

    Returns ``[norm over all params (B,)]`` when ``flat``, else one ``(B,)`` norm per param.

    Args:
        named_params: ``(name, per-sample gradient)`` pairs.
        flat: one norm over all parameters (True) or one per parameter (False).

    Returns:
        the norms.

    Raises:
        ValueError: the per-sample gradients disagree on the batch size.
    """
    norms = [calc_sample_norms_one_layer(p) for _, p in named_params]
    if flat:
        if not norms:
            raise ValueError("calc_sample_norms: named_params is empty")
        return [torch.stack(norms, dim=0).norm(2, dim=0)]
    return norms

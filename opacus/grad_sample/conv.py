"""Per-sample gradients of ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

The gradient of sample ``i``'s loss w.r.t. the weight is ``b_i unfold(x_i)^T`` (Goodfellow 2015,
"Efficient per-example gradient computations"), which can be computed three ways:

* ``"unfold"``: im2col of the input, then one ``(O, L) @ (L, K)`` product per (sample, group);
* ``"unfold_transposed"``: the same im2col, the product taken as ``(K, L) @ (L, O)`` and copied
  into the weight layout (measured faster for few channels and long outputs, e.g. 3 -> 16);
* ``"convolution"``: the weight gradient of one grouped convolution with the batch folded into
  the groups (Rochette et al. 2019, "Efficient per-example gradient computations in
  convolutional neural networks"), computed by the backend's own convolution kernels
  (oneDNN / cuDNN) with no im2col buffer.

None wins for every shape, so by default (``"auto"``) the first call for a key (layer type,
channels, kernel, stride, padding, dilation, groups, padding mode, per-sample input shape, dtype,
device; not the batch size, which Poisson sampling varies) times every strategy and caches the
fastest for later calls.  A layer configuration that meets more than :data:`MAX_TUNED_SHAPES`
input shapes (e.g. a variable-length ``Conv1d``) stops timing and reuses the strategy that won
most often for it.  With ``torch.use_deterministic_algorithms(True)`` the timing-dependent choice
is skipped and ``"unfold"`` is always used, even over a forced strategy.

:func:`set_conv_strategy` forces one strategy for every convolution (``"auto"`` restores the
timing); :func:`clear_conv_strategy_cache` forgets the cached choices.
"""

import time
from collections import Counter
from typing import Callable, Dict, Hashable, List, Optional, Tuple, Union

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
    "set_conv_strategy",
    "clear_conv_strategy_cache",
]

ConvNd = Union[nn.Conv1d, nn.Conv2d, nn.Conv3d]

# Distinct per-sample input shapes timed per layer configuration before the timing stops.
MAX_TUNED_SHAPES = 16


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


def _windows2d(owner, x: torch.Tensor, padding, kernel, stride, dilation) -> torch.Tensor:
    """im2col of ``x (B, C, H, W)`` as ``(B, C * kh * kw, L)``, written into a pooled buffer.

    The windows are a strided view of the (zero-padded) input, copied once into a buffer reused
    across steps (``owner``'s ``"im2col"`` slot): ~10x cheaper on CPU than ``F.unfold``'s fresh
    allocation (page faults, see ``buffers``).  Same layout as ``F.unfold``: channel-major, then
    kernel row, kernel column.
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
        owner, "im2col", (batch, channels, kh, kw, h_out, w_out), dtype=x.dtype, device=x.device
    )
    out.copy_(win.permute(0, 1, 4, 5, 2, 3))
    return out.view(batch, channels * kh * kw, h_out * w_out)


def _im2col(layer: ConvNd, x: torch.Tensor, owner) -> torch.Tensor:
    """``(B * groups, K, L)`` columns of the padded input, one block per (sample, group)."""
    x, pads = _padded_input(layer, x)
    padding = tuple(lo for lo, _ in pads)
    n = len(layer.kernel_size)
    if n == 1:
        # A 1-D convolution is a 2-D one over a height-1 image.
        cols = _windows2d(
            owner,
            x.unsqueeze(-2),
            (0, padding[0]),
            (1, layer.kernel_size[0]),
            (1, layer.stride[0]),
            (1, layer.dilation[0]),
        )
    elif n == 2:
        cols = _windows2d(owner, x, padding, layer.kernel_size, layer.stride, layer.dilation)
    else:
        cols = unfold3d(
            x,
            kernel_size=layer.kernel_size,
            padding=padding,
            stride=layer.stride,
            dilation=layer.dilation,
        )
    groups = layer.groups
    return cols.reshape(x.shape[0] * groups, cols.shape[1] // groups, cols.shape[-1])


def _unfold_weight_grad(layer: ConvNd, x: torch.Tensor, g: torch.Tensor, owner) -> torch.Tensor:
    """``(B, *weight.shape)`` as one ``(O/g, L) @ (L, K)`` product per (sample, group)."""
    batch = x.shape[0]
    cols = _im2col(layer, x, owner)
    b = g.reshape(cols.shape[0], layer.out_channels // layer.groups, cols.shape[-1])
    out = reusable_empty(
        owner, "weight", (cols.shape[0], b.shape[1], cols.shape[1]), dtype=x.dtype, device=x.device
    )
    torch.bmm(b, cols.transpose(1, 2), out=out)
    return out.view(batch, *layer.weight.shape)


def _unfold_transposed_weight_grad(
    layer: ConvNd, x: torch.Tensor, g: torch.Tensor, owner
) -> torch.Tensor:
    """``(B, *weight.shape)`` as ``(K, L) @ (L, O/g)`` products, transposed into place."""
    batch = x.shape[0]
    cols = _im2col(layer, x, owner)
    b = g.reshape(cols.shape[0], layer.out_channels // layer.groups, cols.shape[-1])
    shape = (cols.shape[0], cols.shape[1], b.shape[1])
    product = reusable_empty(owner, "weight_t", shape, dtype=x.dtype, device=x.device)
    torch.bmm(cols, b.transpose(1, 2), out=product)
    out = reusable_empty(
        owner, "weight", (shape[0], shape[2], shape[1]), dtype=x.dtype, device=x.device
    )
    out.copy_(product.transpose(1, 2))
    return out.view(batch, *layer.weight.shape)


def _convolution_weight_grad(
    layer: ConvNd, x: torch.Tensor, g: torch.Tensor, owner=None
) -> torch.Tensor:
    """``(B, *weight.shape)`` as the weight gradient of one grouped convolution.

    Folding the batch into the channels, ``x (1, B * C_in, ...)`` convolved with ``B * groups``
    groups by a ``(B * C_out, C_in / groups, *kernel)`` weight gives sample ``i`` its own copy of
    the weight, whose gradient is sample ``i``'s gradient (Rochette et al. 2019).  That gradient
    does not depend on the weight's values, so an uninitialised one serves.
    """
    batch = x.shape[0]
    if batch == 0:
        return x.new_zeros((0, *layer.weight.shape))
    # The kernels take symmetric zero padding only: pre-pad other modes and uneven "same".
    x, pads = _padded_input(layer, x)
    x1 = x.reshape(1, -1, *x.shape[2:])
    g1 = g.reshape(1, -1, *g.shape[2:])
    weight = torch.empty(
        (batch * layer.out_channels, *layer.weight.shape[1:]), dtype=x.dtype, device=x.device
    )
    n = len(layer.kernel_size)
    grad_weight = torch.ops.aten.convolution_backward(
        g1,
        x1,
        weight,
        None,
        list(layer.stride),
        [lo for lo, _ in pads],
        list(layer.dilation),
        False,
        [0] * n,
        batch * layer.groups,
        (False, True, False),
    )[1]
    return grad_weight.reshape(batch, *layer.weight.shape)


Strategy = Callable[[ConvNd, torch.Tensor, torch.Tensor, object], torch.Tensor]

_STRATEGIES: Dict[str, Strategy] = {
    "unfold": _unfold_weight_grad,
    "unfold_transposed": _unfold_transposed_weight_grad,
    "convolution": _convolution_weight_grad,
}
_DETERMINISTIC_STRATEGY = "unfold"

_forced: Optional[str] = None
# key -> name of the fastest strategy measured for it.
_choices: Dict[Hashable, str] = {}
# layer configuration -> how often each strategy won among its timed keys.
_wins: Dict[Hashable, Counter] = {}


def set_conv_strategy(strategy: str) -> None:
    """Use ``strategy`` for every convolution's per-sample weight gradients.

    Args:
        strategy: ``"auto"`` (default: time the strategies once per layer and input shape and
            keep the fastest), ``"unfold"``, ``"unfold_transposed"`` or ``"convolution"``.
    """
    global _forced
    if strategy != "auto" and strategy not in _STRATEGIES:
        raise ValueError(
            f"set_conv_strategy: unknown strategy {strategy!r}; expected 'auto' or one of "
            f"{sorted(_STRATEGIES)}"
        )
    _forced = None if strategy == "auto" else strategy


def clear_conv_strategy_cache() -> None:
    """Forget every strategy chosen by timing (the next call of each layer times again)."""
    _choices.clear()
    _wins.clear()


def _layer_config(layer: ConvNd) -> Tuple:
    return (
        type(layer),
        layer.in_channels,
        layer.out_channels,
        tuple(layer.kernel_size),
        tuple(layer.stride),
        layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
        tuple(layer.dilation),
        layer.groups,
        layer.padding_mode,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TrialPool:
    """Owner of the buffers of timing runs: they go with it, not stay pooled on the layer."""


# Monotonic clock of the timing runs (a test seam).
_clock = time.perf_counter

# Timed runs of each strategy after its warm-up run; the best run counts.  More than one: on a
# shared machine a run that waits for a descheduled worker thread can take 10x longer.
TIMED_RUNS = 2


def _autotune(layer: ConvNd, x: torch.Tensor, g: torch.Tensor) -> Tuple[str, torch.Tensor]:
    """Time every strategy (a warm-up run, then rounds in alternation); keep the fastest.

    Returns the winner's name and the result of its fastest run.
    """
    # One pool per strategy: the kept result of one must not take another's buffers.
    owners = {name: _TrialPool() for name in _STRATEGIES}
    candidates = {}
    for name, fn in _STRATEGIES.items():
        # Warm-up (first-touch allocations, kernel selection).  A backend without a grouped
        # convolution for this dtype / device drops out; the deterministic default must run.
        try:
            fn(layer, x, g, owners[name])
        except (RuntimeError, NotImplementedError):
            if name == _DETERMINISTIC_STRATEGY:
                raise
            continue
        candidates[name] = fn
    best, best_time, best_out = None, float("inf"), None
    for _ in range(TIMED_RUNS):
        for name, fn in candidates.items():
            _sync(x.device)
            start = _clock()
            out = fn(layer, x, g, owners[name])
            _sync(x.device)
            elapsed = _clock() - start
            if elapsed < best_time:
                best, best_time, best_out = name, elapsed, out
            del out  # at most two results alive at once
    return best, best_out


def _weight_grad(layer: ConvNd, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if torch.are_deterministic_algorithms_enabled():
        return _STRATEGIES[_DETERMINISTIC_STRATEGY](layer, x, g, layer)
    if _forced is not None:
        return _STRATEGIES[_forced](layer, x, g, layer)
    config = _layer_config(layer)
    key = (config, tuple(x.shape[1:]), x.dtype, x.device)
    name = _choices.get(key)
    if name is None:
        wins = _wins.setdefault(config, Counter())
        if sum(wins.values()) >= MAX_TUNED_SHAPES:
            name = wins.most_common(1)[0][0]
        else:
            name, out = _autotune(layer, x, g)
            _choices[key] = name
            wins[name] += 1
            return out
    return _STRATEGIES[name](layer, x, g, layer)


def _grad_samples(
    layer: ConvNd,
    x: torch.Tensor,
    backprops: torch.Tensor,
    weight_grad: Callable[[ConvNd, torch.Tensor, torch.Tensor], torch.Tensor],
) -> Dict[nn.Parameter, torch.Tensor]:
    # Under autocast the captured input and the output gradient can differ in precision.
    dtype = torch.promote_types(x.dtype, backprops.dtype)
    x, backprops = x.to(dtype), backprops.to(dtype)
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = weight_grad(layer, x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.flatten(2).sum(dim=-1)
    return ret


@register_grad_sampler([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def compute_conv_grad_sample(
    layer: ConvNd, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a convolution (strategy chosen per shape, see the module doc).

    Args:
        layer: an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (any stride, padding incl.
            ``"same"``/``"valid"``, dilation, groups and padding mode).
        activations: ``[x]`` with ``x`` of shape ``(B, C_in, *spatial)``.
        backprops: gradient w.r.t. the output, ``(B, C_out, *spatial_out)``.

    Returns:
        ``{weight: (B, *weight.shape), bias: (B, C_out)}`` for the parameters that require grad.
    """
    _check_input(layer, activations[0])
    return _grad_samples(layer, activations[0], backprops, _weight_grad)


def convolution2d_backward_as_a_convolution(
    layer: nn.Conv2d, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an ``nn.Conv2d`` computed as one grouped convolution.

    Always the ``"convolution"`` strategy of :func:`compute_conv_grad_sample` (no im2col
    buffer), whatever :func:`set_conv_strategy` says.

    Args:
        layer: the ``nn.Conv2d``.
        activations: the layer's input ``(B, C_in, H, W)``.
        backprops: the gradient of the loss with respect to the layer's output.

    Returns:
        ``{parameter: per-sample gradients}`` of the layer.

    Raises:
        ValueError: ``layer`` is not an ``nn.Conv2d``.
    """
    x = activations[0]
    if _check_input(layer, x) != 2:
        raise ValueError(
            f"convolution2d_backward_as_a_convolution: {type(layer).__name__} is not a Conv2d; "
            "use compute_conv_grad_sample"
        )
    return _grad_samples(layer, x, backprops, _convolution_weight_grad)

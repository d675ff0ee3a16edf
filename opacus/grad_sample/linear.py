"""Per-sample gradients and gradient norms of ``nn.Linear``.

For ``y = x W^T + b`` the gradient of sample ``i``'s loss is ``sum_t b_{i,t} a_{i,t}^T`` (weight)
and ``sum_t b_{i,t}`` (bias), where ``t`` runs over every dimension between the batch and the
features (sequence positions, image rows, ...).  The norm sampler is the "ghost norm" of
Goodfellow (2015), extended to sequences by Li et al. (2022), "Large language models can be strong
differentially private learners", Sec. 4: the Frobenius norm of ``B_i^T A_i`` equals
``<A_i A_i^T, B_i B_i^T>``, which never builds the ``(d_out, d_in)`` per-sample gradient.  The
clipped sum ``sum_i c_i B_i^T A_i`` is one matrix product of the stacked, re-weighted backprops
with the stacked activations (book-keeping, Bu et al. 2023).
"""

from typing import Dict, List

import torch
import torch.nn as nn

from opacus.grad_sample.buffers import reusable_empty
from opacus.grad_sample.registry import (
    KEEPS_GRADS_ATTR,
    SUMS_OVER_SEQUENCE_ATTR,
    register_clipped_sum_sampler,
    register_grad_sampler,
    register_norm_sampler,
)


def _as_sequences(activations: torch.Tensor, backprops: torch.Tensor, min_dtype=None):
    """Collapse every dim between batch and features into one ``T`` dim: (B, T, d).

    ``min_dtype`` (float32 for norms) lifts half-precision inputs: a Gram matrix or a squared
    norm of float16 values overflows past 65504, and bfloat16 drops the small terms.
    """
    batch = activations.shape[0]
    # Under autocast the captured input and the output gradient can differ in precision.
    dtype = torch.promote_types(activations.dtype, backprops.dtype)
    if min_dtype is not None:
        dtype = torch.promote_types(dtype, min_dtype)
    a = activations.reshape(batch, -1, activations.shape[-1])
    b = backprops.reshape(batch, -1, backprops.shape[-1])
    # ``to`` only where it converts: a no-op ``to`` still costs a dispatch per layer and pass.
    return (a if a.dtype == dtype else a.to(dtype)), (b if b.dtype == dtype else b.to(dtype))


@register_grad_sampler(nn.Linear)
def compute_linear_grad_sample(
    layer: nn.Linear, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an ``nn.Linear`` layer.

    Args:
        layer: the layer.
        activations: ``[x]`` with ``x`` of shape ``(B, ..., in_features)``.
        backprops: gradient w.r.t. the output, shape ``(B, ..., out_features)``.

    Returns:
        ``{weight: (B, out, in), bias: (B, out)}`` for the parameters that require grad.
    """
    a, b = _as_sequences(activations[0], backprops)
    ret = {}
    if layer.weight.requires_grad:
        out = reusable_empty(
            layer, "weight", (a.shape[0], b.shape[2], a.shape[2]), dtype=a.dtype, device=a.device
        )
        if a.shape[1] == 1:
            # One position per sample: an outer product; broadcasting beats a k=1 bmm (~2x).
            torch.mul(b.transpose(1, 2), a, out=out)
        else:
            # (B, d_out, T) @ (B, T, d_in): one batched matmul, no per-sample loop.
            torch.bmm(b.transpose(1, 2), a, out=out)
        ret[layer.weight] = out
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = b.sum(dim=1)
    return ret


setattr(compute_linear_grad_sample, SUMS_OVER_SEQUENCE_ATTR, True)


def _gram_norm_is_cheaper(seq_len: int, d_in: int, d_out: int) -> bool:
    """True if the ghost norm (two ``(T, T)`` Gram matrices per sample: ``2 B T^2 (d_in +
    d_out)`` flops) costs no more than materialising the ``(d_out, d_in)`` per-sample gradient
    (``2 B T d_in d_out`` flops, plus a pass over it).

    Li et al. (2022) compare the memory (``2 T^2`` against ``d_in d_out``); for time the flops
    decide, and where they choose the gradient it is smaller than the layer's activations and
    backprops (``T (d_in + d_out)`` elements per sample), which exist anyway.
    """
    return seq_len * (d_in + d_out) <= d_in * d_out


def _weight_norm_squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||b_i^T a_i||_F^2`` per sample for ``a: (B, T, d_in)``, ``b: (B, T, d_out)``."""
    if _gram_norm_is_cheaper(a.shape[1], a.shape[2], b.shape[2]):
        # Ghost norm: ||sum_t b_t a_t^T||_F^2 = sum_{t,s} (a_t . a_s)(b_t . b_s); memory B*T^2.
        gram_a = torch.bmm(a, a.transpose(1, 2))
        gram_b = torch.bmm(b, b.transpose(1, 2))
        return (gram_a * gram_b).sum(dim=(1, 2))
    # Long sequences: the (B, d_out, d_in) gradient is the cheaper (and smaller) object.
    return torch.linalg.vector_norm(torch.bmm(b.transpose(1, 2), a), dim=(1, 2)).square()


def _plain_2d(x: torch.Tensor, b: torch.Tensor) -> bool:
    """A ``(B, d)`` input and output gradient of one float32/float64 dtype: one position per
    sample, taken without the sequence reshapes and dtype promotions (a few dispatches fewer per
    layer and pass, which on a small layer is a good part of its cost)."""
    return x.dim() == 2 and b.dim() == 2 and x.dtype == b.dtype and x.dtype in _WIDE_FLOATS


_WIDE_FLOATS = (torch.float32, torch.float64)


def _norms_2d(layer: nn.Linear, x: torch.Tensor, b: torch.Tensor) -> Dict:
    """``compute_linear_norm_sample`` of a ``(B, d)`` input: the gradient ``b_i x_i^T`` has
    norm ``||b_i|| ||x_i||``."""
    ret = {}
    b_norm = torch.linalg.vector_norm(b, dim=1)
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.linalg.vector_norm(x, dim=1).mul_(b_norm)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = b_norm
    return ret


def _clipped_sum_2d(layer: nn.Linear, x: torch.Tensor, b: torch.Tensor, weights) -> Dict:
    """``compute_linear_clipped_sum`` of a ``(B, d)`` input: ``(w * b)^T x`` (the smaller of
    ``x`` and ``b`` re-weighted) and ``w^T b``."""
    ret = {}
    if layer.weight.requires_grad:
        w = weights.unsqueeze(1)
        x_w, b_w = (x * w, b) if x.shape[1] < b.shape[1] else (x, b * w)
        ret[layer.weight] = b_w.t() @ x_w
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = weights @ b
    return ret


@register_norm_sampler(nn.Linear)
def compute_linear_norm_sample(
    layer: nn.Linear, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient L2 norms of an ``nn.Linear`` layer (ghost clipping).

    Args:
        layer: the layer.
        activations: ``[x]`` with ``x`` of shape ``(B, ..., in_features)``.
        backprops: gradient w.r.t. the output, shape ``(B, ..., out_features)``.

    Returns:
        ``{weight: (B,), bias: (B,)}`` for the parameters that require grad.
    """
    if _plain_2d(activations[0], backprops):
        return _norms_2d(layer, activations[0], backprops)
    a, b = _as_sequences(activations[0], backprops, min_dtype=torch.float32)
    ret = {}
    if a.shape[1] == 1:
        # One position: the gradient is the outer product b a^T, of norm ||b|| ||a||.
        b_norm = torch.linalg.vector_norm(b, dim=(1, 2))
        if layer.weight.requires_grad:
            ret[layer.weight] = torch.linalg.vector_norm(a, dim=(1, 2)) * b_norm
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = b_norm
        return ret
    if layer.weight.requires_grad:
        # Rounding can push the Gram contraction a hair below zero.
        ret[layer.weight] = _weight_norm_squared(a, b).clamp_min(0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = b.sum(dim=1).norm(2, dim=-1)
    return ret


# Book-keeping keeps a materialised per-sample gradient in place of the activations and
# backprops: one batched product (as many flops as the clipped-sum product it replaces) and two
# passes over the gradient (its norm, then the weighted sum), against the two Gram products plus
# the clipped-sum product.  Measured on one CPU core (float32, batch 8, the GPT-2 layers' shapes
# and T = 8..128), keeping wins once ``d_in d_out / (T^2 (d_in + d_out))`` falls below ~0.04;
# the factor below asks for half that.  The memory factor bounds the kept gradient by twice
# the activations and backprops it replaces (ghost clipping is there to save memory).  The norm
# pass holds every layer's backprops until its end anyway, so a kept gradient adds its own size
# to that pass's memory: on the LM benchmark (batch 8, T = 128) keeping the 4096-way head
# (1.9x) takes ~2% off the step and adds 23% to its peak memory (1.04x -> 1.23x of the
# non-private step); 1.75 here would leave the head on the Gram path.  At T = 512 every layer's
# gradient is smaller than what it replaces.
_KEEP_FLOP_FACTOR = 50
_KEEP_MEMORY_FACTOR = 2
_KEEP_DTYPES = (torch.float32, torch.float64)


def _keeping_grad_is_cheaper(seq_len: int, d_in: int, d_out: int) -> bool:
    """True if book-keeping should keep the ``(d_out, d_in)`` per-sample gradient (above)."""
    return d_in * d_out * _KEEP_FLOP_FACTOR <= seq_len * seq_len * (
        d_in + d_out
    ) and d_in * d_out <= _KEEP_MEMORY_FACTOR * seq_len * (d_in + d_out)


def _flat_norms(g: torch.Tensor) -> torch.Tensor:
    """``(B,)`` norms of the rows of ``g`` flattened past the batch dim."""
    return torch.linalg.vector_norm(g.view(g.shape[0], -1), dim=1)


def linear_norms_keeping_grads(
    layer: nn.Module,
    activations: List[torch.Tensor],
    backprops: torch.Tensor,
    in_out: bool = False,
):
    """``(norms, kept)`` of an ``nn.Linear`` (``in_out``: a weight stored ``(in, out)``, as
    ``transformers``' ``Conv1D``) for a book-keeping norm pass (``registry.KEEPS_GRADS_ATTR``).

    ``kept`` is ``{param: per-sample gradient}`` where keeping is cheaper
    (``_keeping_grad_is_cheaper``; a frozen weight leaves only the bias's ``(B, out)``
    gradient, always kept), else None with the ghost norms of ``compute_linear_norm_sample``.
    """
    if activations[0].dim() == 2:  # one position per sample: never kept
        return compute_linear_norm_sample(layer, activations, backprops), None
    a, b = _as_sequences(activations[0], backprops)
    weight, bias = layer.weight, layer.bias
    if (
        a.shape[1] == 1
        or a.dtype not in _KEEP_DTYPES
        or (weight.requires_grad and not _keeping_grad_is_cheaper(*a.shape[1:], b.shape[2]))
    ):
        return compute_linear_norm_sample(layer, activations, backprops), None
    kept = {}
    if weight.requires_grad:
        batch, d_in, d_out = a.shape[0], a.shape[2], b.shape[2]
        shape = (batch, d_in, d_out) if in_out else (batch, d_out, d_in)
        out = reusable_empty(layer, "weight", shape, dtype=a.dtype, device=a.device)
        if in_out:
            kept[weight] = torch.bmm(a.transpose(1, 2), b, out=out)
        else:
            kept[weight] = torch.bmm(b.transpose(1, 2), a, out=out)
    if bias is not None and bias.requires_grad:
        kept[bias] = b.sum(dim=1)
    norms = {p: _flat_norms(g) for p, g in kept.items()}
    return norms, kept


setattr(compute_linear_norm_sample, KEEPS_GRADS_ATTR, linear_norms_keeping_grads)


@register_clipped_sum_sampler(nn.Linear)
def compute_linear_clipped_sum(
    layer: nn.Linear,
    activations: List[torch.Tensor],
    backprops: torch.Tensor,
    weights: torch.Tensor,
) -> Dict[nn.Parameter, torch.Tensor]:
    """``sum_i weights_i * g_i`` of an ``nn.Linear`` layer's per-sample gradients ``g_i``.

    Args:
        layer: the layer.
        activations: ``[x]`` with ``x`` of shape ``(B, ..., in_features)``.
        backprops: gradient w.r.t. the output, shape ``(B, ..., out_features)``, scaled as for
            the grad sampler (slice ``i`` is the gradient of sample ``i``'s own loss).
        weights: ``(B,)`` per-sample weights (the clipping coefficients).

    Returns:
        ``{weight: (out, in), bias: (out,)}`` for the parameters that require grad.
    """
    if _plain_2d(activations[0], backprops) and weights.dtype == backprops.dtype:
        return _clipped_sum_2d(layer, activations[0], backprops, weights)
    a, b = _as_sequences(activations[0], backprops)
    w = weights.to(b.dtype).view(-1, 1, 1)
    ret = {}
    if layer.weight.requires_grad:
        # Re-weight the smaller of a and b (a copy of it; e.g. a language model's head has
        # 16x more outputs than inputs), then one matrix product.
        a_w, b_w = (a * w, b) if a.shape[2] < b.shape[2] else (a, b * w)
        ret[layer.weight] = b_w.reshape(-1, b.shape[2]).t() @ a_w.reshape(-1, a.shape[2])
    if layer.bias is not None and layer.bias.requires_grad:
        # One position: summing over it would only copy b.
        b_sum = b[:, 0] if b.shape[1] == 1 else b.sum(dim=1)
        ret[layer.bias] = weights.to(b.dtype) @ b_sum
    return ret

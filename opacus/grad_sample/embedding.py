"""Per-sample gradients of ``nn.Embedding`` and ``nn.EmbeddingBag``.

A lookup's weight gradient is a scatter: row ``v`` receives the backprop of every position that
reads ``v``.  Adding the backprops row by row (``index_add_``) into a per-sample
``(B, vocab, dim)`` buffer gives all per-sample gradients at once; the buffer is reused across
steps and only the rows the previous step wrote are zeroed again (``buffers.reusable_row_zeros``).
The norm sampler lives in ``embedding_norm_sample``.  Book-keeping (``embedding_bookkeeping``,
``embeddingbag_bookkeeping``) hands the optimizer each sample's norm and the clipped sum from the
indices and output gradients, so that it never reads the dense per-sample gradient.
"""

import functools
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from opacus.grad_sample.buffers import (
    is_unshared_buffer,
    record_written_rows,
    reusable_row_zeros,
)
from opacus.grad_sample.embedding_norm_sample import (
    compute_embedding_clipped_sum,
    compute_embedding_norm_sample,
)
from opacus.grad_sample.registry import register_grad_sampler, register_norm_sampler

__all__ = [
    "compute_embedding_grad_sample",
    "compute_embedding_norm_sample",
    "compute_embeddingbag_gradsampler",
    "embedding_bookkeeping",
    "embeddingbag_bookkeeping",
    "register_grad_sampler",
    "register_norm_sampler",
]


def _scatter_rows(
    layer: nn.Module, index: torch.Tensor, values: torch.Tensor, vocab: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``out[i, index[i, t]] += values[i, t]``: ``(B, T)``, ``(B, T, D)`` -> ``(B, vocab, D)``.

    ``out`` is the layer's reused buffer: of last step's rows only those it wrote are zeroed
    (``reusable_row_zeros``).  Returns ``out`` and the rows written (indices into its
    ``(B * vocab, D)`` view), which the caller records (``record_written_rows``) after its last
    write into ``out``.
    """
    batch, _, dim = values.shape
    out = reusable_row_zeros(
        layer, "weight", (batch, vocab, dim), dtype=values.dtype, device=values.device
    )
    rows = (torch.arange(batch, device=index.device).unsqueeze(1) * vocab + index).reshape(-1)
    # Row by row (D contiguous values each): several times faster than an element-wise scatter.
    out.view(batch * vocab, dim).index_add_(0, rows, values.reshape(-1, dim))
    return out, rows


def _expanded(index: torch.Tensor, dim: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, dim)


def _tied_buffer(layer: nn.Embedding, b: torch.Tensor):
    """The per-sample gradient another layer already stored for ``layer.weight`` in this pass,
    if the embedding may add into it in place (a pooled buffer no one else holds, of the full
    batch and dtype; no padding row or frequency scaling to apply to the embedding's part)."""
    current = getattr(layer.weight, "_current_grad_sample", None)
    if (
        current is None
        or layer.padding_idx is not None
        or layer.scale_grad_by_freq
        or current.shape != (b.shape[0], *layer.weight.shape)
        or not (current.dtype == b.dtype == layer.weight.dtype)
    ):
        return None
    return current if is_unshared_buffer(current) else None


@register_grad_sampler(nn.Embedding)
def compute_embedding_grad_sample(
    layer: nn.Embedding, activations: torch.Tensor, backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an ``nn.Embedding``.

    Args:
        layer: the layer. Rows at ``padding_idx`` get a zero gradient (as ``nn.Embedding``'s own
            backward); with ``scale_grad_by_freq`` each row is divided by its count in the sample.
        activations: ``[indices]`` (or the index tensor itself) of shape ``(B, ...)``.
        backprops: gradient w.r.t. the output, ``(B, ..., embedding_dim)``.

    Returns:
        ``{weight: (B, num_embeddings, embedding_dim)}`` if the weight requires grad.
    """
    if not layer.weight.requires_grad:
        return {}
    idx = activations if torch.is_tensor(activations) else activations[0]
    batch = idx.shape[0]
    idx = idx.reshape(batch, -1)
    b = backprops.reshape(batch, idx.shape[1], layer.embedding_dim)
    tied = _tied_buffer(layer, b)
    if tied is not None:
        # A weight shared with a layer whose hook ran first in this pass (a language model's
        # head): add the looked-up rows into its per-sample gradient in place.
        return {layer.weight: tied.scatter_add_(1, _expanded(idx, b.shape[2]), b)}
    if layer.scale_grad_by_freq:
        # Each position's backprop divided by its index's count in the sample (as torch's own
        # backward does), before the rows are summed: no pass over the dense gradient.
        keys = torch.arange(batch, device=idx.device).unsqueeze(1) * layer.num_embeddings + idx
        _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        b = b / counts[inverse].unsqueeze(-1).to(b.dtype)
    grad, rows = _scatter_rows(layer, idx, b, layer.num_embeddings)
    if layer.padding_idx is not None:
        grad[:, layer.padding_idx] = 0
    # Every write into the buffer is done: the rows of ``idx`` are all it holds.
    record_written_rows(layer, "weight", grad, rows)
    return {layer.weight: grad}


# Dtypes whose norms the optimizer computes in the gradient's own dtype (halves: float32 after a
# rounding of the stored gradient, which book-kept norms would not see).
_EXACT_NORM_DTYPES = (torch.float32, torch.float64)


def embedding_bookkeeping(
    layer: nn.Embedding, activations: List, backprops: torch.Tensor, max_batch_len: int
) -> Optional[Dict[nn.Parameter, tuple]]:
    """Exact per-sample norms and clipped sum of one call's ``compute_embedding_grad_sample``.

    Book-keeping (Bu et al. 2023), as the hooks do for ``nn.Linear``: sample ``i``'s gradient
    has a non-zero row only for each distinct index it reads, so its norm and the clipped sum
    ``sum_i f_i g_i`` come from the indices and the ``(B, T, dim)`` backprops (ghost clipping's
    ``compute_embedding_norm_sample`` / ``compute_embedding_clipped_sum``, same ``padding_idx``
    and ``scale_grad_by_freq`` semantics as the grad sampler) and spare the optimizer two passes
    over the ``(B, vocab, dim)`` per-sample gradient.

    Args:
        layer: the layer.
        activations: the call's inputs, ``[indices]``.
        backprops: gradient w.r.t. the output, batch first, as given to the grad sampler.
        max_batch_len: the batch size of the pass.

    Returns:
        ``{weight: (norms (B,), clipped_sum)}`` with ``clipped_sum(factors)`` equal to
        ``sum_i factors[i] * grad_sample[i]``; None where the call does not qualify (frozen
        weight, a partial or empty batch, half precision).
    """
    weight = layer.weight
    idx = activations[0] if len(activations) == 1 else None
    if (
        not weight.requires_grad
        or not torch.is_tensor(idx)
        or idx.dim() == 0
        or max_batch_len == 0
        or idx.shape[0] != max_batch_len
        or backprops.shape[0] != max_batch_len
        or backprops.dtype != weight.dtype
        or weight.dtype not in _EXACT_NORM_DTYPES
    ):
        return None
    norms = compute_embedding_norm_sample(layer, activations, backprops)[weight]
    # The indices are the caller's input tensor (detached, not copied): the clipped sum, formed
    # at the optimizer step, must not see an in-place change made since (a few bytes a token).
    clipped_sum = functools.partial(_clipped_weight_sum, layer, [idx.clone()], backprops)
    return {weight: (norms, clipped_sum)}


def _clipped_weight_sum(layer, activations, backprops, factors) -> torch.Tensor:
    return compute_embedding_clipped_sum(layer, activations, backprops, factors)[layer.weight]


def _bags(layer: nn.EmbeddingBag, inputs: List[torch.Tensor]):
    """Flatten EmbeddingBag inputs to ``(indices (N,), bag ids (N,), weights (N,) | None, B)``."""
    idx = inputs[0]
    offsets = inputs[1] if len(inputs) > 1 else None
    per_sample_weights = inputs[2] if len(inputs) > 2 else None
    if idx.dim() == 2:
        if offsets is not None:
            raise ValueError(
                "EmbeddingBag grad sampler: offsets must be None when input is 2-D (B, L)"
            )
        batch, length = idx.shape
        bag = torch.arange(batch, device=idx.device).repeat_interleave(length)
        flat_w = None if per_sample_weights is None else per_sample_weights.reshape(-1)
        return idx.reshape(-1), bag, flat_w, batch
    if idx.dim() != 1 or offsets is None:
        raise ValueError(
            "EmbeddingBag grad sampler: expected a 2-D input (B, L) or a 1-D input with "
            f"offsets passed positionally, got input shape {tuple(idx.shape)} and "
            f"offsets={'None' if offsets is None else tuple(offsets.shape)}"
        )
    if layer.include_last_offset:
        offsets = offsets[:-1]
    batch = offsets.shape[0]
    # Each position belongs to the last bag whose offset is <= its position.
    positions = torch.arange(idx.shape[0], device=idx.device)
    bag = torch.searchsorted(offsets.contiguous(), positions, right=True) - 1
    return idx, bag, per_sample_weights, batch


def compute_embeddingbag_gradsampler(layer, inputs, backprops):
    """Per-sample gradients of an ``nn.EmbeddingBag`` (``mode`` ``"sum"`` or ``"mean"``).

    Each bag is one sample.  ``inputs`` is ``[input]`` with a 2-D ``(B, L)`` input, or
    ``[input, offsets]`` / ``[input, offsets, per_sample_weights]`` with a 1-D input;
    ``backprops`` is ``(B, embedding_dim)``.  Indices equal to ``padding_idx`` are left out of
    their bag (and of the mean's count), as in ``nn.EmbeddingBag``.

    Returns:
        ``{weight: (B, num_embeddings, embedding_dim)}`` if the weight requires grad.

    Args:
        layer: the ``nn.EmbeddingBag``.
        inputs: the layer's positional inputs: indices, and offsets for a 1-D input.
        backprops: the gradient of the loss with respect to the layer's output, one row per bag.

    Raises:
        NotImplementedError: the layer's mode is ``"max"``.
        ValueError: the input shape or offsets are not one bag per sample.
    """
    if layer.mode not in ("sum", "mean"):
        raise NotImplementedError(
            f"EmbeddingBag grad sampler: mode={layer.mode!r} is not supported; use mode='sum' "
            "or 'mean'"
        )
    if not layer.weight.requires_grad:
        return {}
    idx, bag, coef, batch = _bag_terms(layer, inputs, backprops)
    values = backprops[bag] * coef.unsqueeze(1)
    # One row per (bag, index) pair: flat key bag * vocab + index into the (B * vocab, D) view
    # of the layer's reused buffer (of last step's rows only those written are zeroed).
    vocab, dim = layer.num_embeddings, layer.embedding_dim
    grad = reusable_row_zeros(
        layer, "weight", (batch, vocab, dim), dtype=backprops.dtype, device=backprops.device
    )
    rows = bag * vocab + idx
    grad.view(batch * vocab, dim).index_add_(0, rows, values)
    record_written_rows(layer, "weight", grad, rows)
    return {layer.weight: grad}


def _bag_terms(layer: nn.EmbeddingBag, inputs, backprops: torch.Tensor):
    """``(indices (N,), bag ids (N,), coefficients (N,), B)``: bag ``i``'s gradient row ``v`` is
    ``b_i`` times the sum of the coefficients of its positions holding ``v`` (0 at
    ``padding_idx``, ``1 / count`` in mode ``"mean"``, times ``per_sample_weights``)."""
    idx, bag, weights, batch = _bags(layer, list(inputs))
    if backprops.shape[0] != batch:
        raise ValueError(
            f"EmbeddingBag grad sampler: {batch} bags but backprops has {backprops.shape[0]} "
            "rows; one bag per sample is required"
        )
    if layer.padding_idx is None:
        coef = torch.ones(idx.shape[0], dtype=backprops.dtype, device=backprops.device)
    else:
        coef = (idx != layer.padding_idx).to(backprops.dtype)
    if layer.mode == "mean":
        counts = torch.zeros(batch, dtype=backprops.dtype, device=backprops.device)
        counts.index_add_(0, bag, coef)
        coef = coef / counts.clamp_min(1)[bag]
    if weights is not None:
        coef = coef * weights.to(backprops.dtype)
    return idx, bag, coef, batch


def embeddingbag_bookkeeping(
    layer: nn.EmbeddingBag, activations: List, backprops: torch.Tensor, max_batch_len: int
) -> Optional[Dict[nn.Parameter, tuple]]:
    """``embedding_bookkeeping`` for an ``nn.EmbeddingBag`` (``compute_embeddingbag_gradsampler``).

    Bag ``i``'s gradient is ``g_i[v] = c_{i,v} b_i`` with ``c_{i,v}`` the summed coefficients of
    its positions holding ``v`` (``_bag_terms``), so ``||g_i|| = ||b_i|| sqrt(sum_v c_{i,v}^2)``
    and ``sum_i f_i g_i`` is one ``index_add_`` of the ``f_i c b_i`` rows into ``(vocab, dim)``.

    Returns:
        ``{weight: (norms (B,), clipped_sum)}``, or None where the call does not qualify.
    """
    weight = layer.weight
    if (
        not weight.requires_grad
        or layer.mode not in ("sum", "mean")
        or max_batch_len == 0
        or backprops.dim() != 2
        or backprops.shape[0] != max_batch_len
        or backprops.dtype != weight.dtype
        or weight.dtype not in _EXACT_NORM_DTYPES
    ):
        return None
    idx, bag, coef, _ = _bag_terms(layer, activations, backprops)
    vocab = layer.num_embeddings
    unique_keys, group = torch.unique(bag * vocab + idx, return_inverse=True)
    summed = torch.zeros(unique_keys.shape[0], dtype=coef.dtype, device=coef.device)
    summed.index_add_(0, group, coef)
    owner = torch.div(unique_keys, vocab, rounding_mode="floor")
    coef_sq = torch.zeros(max_batch_len, dtype=coef.dtype, device=coef.device)
    coef_sq.index_add_(0, owner, summed.square())
    norms = torch.linalg.vector_norm(backprops, dim=1) * coef_sq.sqrt()
    # ``idx`` may be a view of the caller's input: copied, as in ``embedding_bookkeeping``.
    clipped_sum = functools.partial(_bag_clipped_sum, layer, idx.clone(), bag, coef, backprops)
    return {weight: (norms, clipped_sum)}


def _bag_clipped_sum(layer, idx, bag, coef, backprops, factors) -> torch.Tensor:
    """``sum_i factors[i] * g_i`` of an EmbeddingBag's per-bag gradients ``g_i``."""
    scale = factors.to(backprops.dtype)[bag] * coef
    grad = torch.zeros(
        layer.num_embeddings, backprops.shape[1], dtype=backprops.dtype, device=backprops.device
    )
    return grad.index_add_(0, idx, backprops[bag] * scale.unsqueeze(1))


register_grad_sampler(nn.EmbeddingBag)(compute_embeddingbag_gradsampler)

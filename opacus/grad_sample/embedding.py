"""Per-sample gradients of ``nn.Embedding`` and ``nn.EmbeddingBag``.

A lookup's weight gradient is a scatter: row ``v`` receives the backprop of every position that
reads ``v``.  Scattering into a per-sample ``(B, vocab, dim)`` buffer gives all per-sample
gradients in one ``scatter_add``.  The norm sampler lives in ``embedding_norm_sample``.
"""

from typing import Dict, List

import torch
import torch.nn as nn

from opacus.grad_sample.buffers import is_unshared_buffer, reusable_empty
from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample
from opacus.grad_sample.registry import register_grad_sampler, register_norm_sampler

__all__ = [
    "compute_embedding_grad_sample",
    "compute_embedding_norm_sample",
    "compute_embeddingbag_gradsampler",
    "register_grad_sampler",
    "register_norm_sampler",
]


def _scatter_rows(
    layer: nn.Module, index: torch.Tensor, values: torch.Tensor, vocab: int
) -> torch.Tensor:
    """``out[i, index[i, t]] += values[i, t]``: ``(B, T)``, ``(B, T, D)`` -> ``(B, vocab, D)``."""
    batch, _, dim = values.shape
    out = reusable_empty(
        layer, "weight", (batch, vocab, dim), dtype=values.dtype, device=values.device
    ).zero_()
    return out.scatter_add_(1, _expanded(index, dim), values)


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
    grad = _scatter_rows(layer, idx, b, layer.num_embeddings)
    if layer.scale_grad_by_freq:
        counts = torch.zeros(batch, layer.num_embeddings, dtype=b.dtype, device=b.device)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=b.dtype))
        grad = grad / counts.clamp_min(1).unsqueeze(-1)
    if layer.padding_idx is not None:
        grad[:, layer.padding_idx] = 0
    return {layer.weight: grad}


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
    values = backprops[bag] * coef.unsqueeze(1)
    # One row per (bag, index) pair: flat key bag * vocab + index into a (B * vocab, D) buffer.
    vocab, dim = layer.num_embeddings, layer.embedding_dim
    grad = torch.zeros(batch * vocab, dim, dtype=backprops.dtype, device=backprops.device)
    grad.index_add_(0, bag * vocab + idx, values)
    return {layer.weight: grad.reshape(batch, vocab, dim)}


register_grad_sampler(nn.EmbeddingBag)(compute_embeddingbag_gradsampler)

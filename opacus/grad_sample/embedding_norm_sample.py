"""Per-sample gradient norms of ``nn.Embedding`` without the ``(B, vocab, dim)`` tensor.

Sample ``i``'s weight gradient has one non-zero row per distinct index ``v`` it looks up, equal to
the sum of the backprops at the positions holding ``v``.  So
``||g_i||^2 = sum_v ||sum_{t: idx_t = v} b_{i,t}||^2``: group the (sample, index) pairs, sum each
group's backprops, and add up the squared norms per sample.  A row read once contributes its
position's squared norm directly, so only rows read several times by a sample are summed into a
working copy: memory ``O(B * T + R * dim)`` for ``R`` such rows.  The
clipped sum ``sum_i c_i g_i`` (book-keeping, Bu et al. 2023) is one scatter of the re-weighted
backprops into a ``(vocab, dim)`` gradient.
"""

from typing import Dict, List

import torch
import torch.nn as nn

from opacus.grad_sample.registry import register_clipped_sum_sampler, register_norm_sampler


def _indices(activations) -> torch.Tensor:
    return activations if torch.is_tensor(activations) else activations[0]


@register_norm_sampler(nn.Embedding)
def compute_embedding_norm_sample(
    layer: nn.Embedding, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient L2 norms of an ``nn.Embedding`` (ghost clipping).

    Args:
        layer: the layer (``padding_idx`` rows get no gradient; ``scale_grad_by_freq`` divides
            each row by its count within the sample).
        activations: ``[indices]`` with ``indices`` of shape ``(B, ...)``.
        backprops: gradient w.r.t. the output, ``(B, ..., embedding_dim)``.

    Returns:
        ``{weight: (B,)}`` if the weight requires grad, else ``{}``.
    """
    if not layer.weight.requires_grad:
        return {}
    idx = _indices(activations)
    batch, vocab = idx.shape[0], layer.num_embeddings
    idx = idx.reshape(batch, -1)
    b = backprops.reshape(-1, backprops.shape[-1])
    if b.dtype in (torch.float16, torch.bfloat16):
        # Squared norms of half-precision rows overflow / lose precision: sum in float32.
        b = b.float()
    sample = torch.arange(batch, device=idx.device).unsqueeze(1).expand_as(idx).reshape(-1)
    keys = sample * vocab + idx.reshape(-1)
    if b.numel() < SMALL_BACKPROPS:
        return {layer.weight: _norms_of_summed_rows(layer, batch, b, keys)}
    unique_keys, group, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    live = None if layer.padding_idx is None else unique_keys % vocab != layer.padding_idx
    # A row read once is that position's backprop: its squared norm, no copy of the row.
    single = counts == 1 if live is None else (counts == 1) & live
    sq = torch.linalg.vector_norm(b, dim=1).square_() * single[group].to(b.dtype)
    norms_sq = torch.zeros(batch, dtype=b.dtype, device=b.device).index_add_(0, sample, sq)
    _add_repeated_rows(layer, norms_sq, b, unique_keys, group, counts, live)
    return {layer.weight: norms_sq.sqrt()}


#: Below this many backprop elements (4 MB in float32) every row a sample reads is summed into a
#: working copy (``_norms_of_summed_rows``): fewer operations, and a transient copy no larger than
#: the backprops; above it only the rows read several times are (``_add_repeated_rows``).
SMALL_BACKPROPS = 2**20


def _norms_of_summed_rows(layer, batch: int, b: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per-sample norms from every (sample, row) group's summed backprops: ``(U, dim)`` for the
    ``U <= B * T`` groups."""
    vocab = layer.num_embeddings
    rows, group, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    summed = torch.zeros(rows.shape[0], b.shape[1], dtype=b.dtype, device=b.device)
    summed.index_add_(0, group, b)
    sq = torch.linalg.vector_norm(summed, dim=1).square_()
    if layer.scale_grad_by_freq:
        sq = sq / counts.to(b.dtype).square()
    if layer.padding_idx is not None:
        sq = sq * (rows % vocab != layer.padding_idx).to(b.dtype)
    owner = torch.div(rows, vocab, rounding_mode="floor")
    norms_sq = torch.zeros(batch, dtype=b.dtype, device=b.device).index_add_(0, owner, sq)
    return norms_sq.sqrt()


def _add_repeated_rows(layer, norms_sq, b, unique_keys, group, counts, live) -> None:
    """Add the squared norms of the rows read several times by a sample: the sum of their
    backprops (divided by the count with ``scale_grad_by_freq``).  Only these ``R`` rows get a
    working copy ``(R + 1, dim)``: memory ``O(R * dim)``, not ``O(B * T * dim)``."""
    repeated = counts > 1 if live is None else (counts > 1) & live
    n_rows = int(repeated.sum())
    if n_rows == 0:
        return
    slot = torch.cumsum(repeated, 0) - 1
    # Positions of other rows go to a spare last row, dropped afterwards.
    target = torch.where(repeated, slot, n_rows)[group]
    summed = torch.zeros(n_rows + 1, b.shape[1], dtype=b.dtype, device=b.device)
    summed = summed.index_add_(0, target, b)[:n_rows]
    if layer.scale_grad_by_freq:
        summed = summed / counts[repeated].unsqueeze(1).to(b.dtype)
    owner = torch.div(unique_keys[repeated], layer.num_embeddings, rounding_mode="floor")
    # vector_norm reduces without a squared copy.
    norms_sq.index_add_(0, owner, torch.linalg.vector_norm(summed, dim=1).square_())


@register_clipped_sum_sampler(nn.Embedding)
def compute_embedding_clipped_sum(
    layer: nn.Embedding,
    activations: List[torch.Tensor],
    backprops: torch.Tensor,
    weights: torch.Tensor,
) -> Dict[nn.Parameter, torch.Tensor]:
    """``sum_i weights_i * g_i`` of an ``nn.Embedding``'s per-sample gradients ``g_i``.

    Same per-sample semantics as the grad sampler: ``padding_idx`` rows get nothing, and with
    ``scale_grad_by_freq`` each row of ``g_i`` is divided by its count *within sample i*.

    Args:
        layer: the layer.
        activations: ``[indices]`` with ``indices`` of shape ``(B, ...)``.
        backprops: gradient w.r.t. the output, ``(B, ..., embedding_dim)``.
        weights: ``(B,)`` per-sample weights (the clipping coefficients).

    Returns:
        ``{weight: (num_embeddings, embedding_dim)}`` if the weight requires grad, else ``{}``.
    """
    if not layer.weight.requires_grad:
        return {}
    idx = _indices(activations)
    batch = idx.shape[0]
    idx = idx.reshape(batch, -1)
    b = backprops.reshape(batch, idx.shape[1], -1)
    b = (b * weights.to(b.dtype).view(-1, 1, 1)).reshape(-1, b.shape[-1])
    flat = idx.reshape(-1)
    if layer.padding_idx is not None:
        b = b * (flat != layer.padding_idx).unsqueeze(1).to(b.dtype)
    if layer.scale_grad_by_freq:
        sample = torch.arange(batch, device=idx.device).unsqueeze(1).expand_as(idx)
        keys = (sample * layer.num_embeddings + idx).reshape(-1)
        _, group, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        b = b / counts[group].unsqueeze(1).to(b.dtype)
    grad = torch.zeros(layer.num_embeddings, b.shape[1], dtype=b.dtype, device=b.device)
    return {layer.weight: grad.index_add_(0, flat, b)}

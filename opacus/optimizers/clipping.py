"""Clipping: per-sample gradients -> per-sample norms -> clip factors -> clipped sum.

Pure functions, tensors in and tensors out; the optimizers compose them.  Nothing here loops over
the batch: a per-sample norm is one reduction per parameter, a clipped sum one ``einsum`` per
parameter (``"i,i...->..."``), so no clipped copy of the per-sample gradients is materialised.

The clip factor is ``min(1, C / (norm + 1e-6))`` (Abadi et al. 2016, "Deep learning with
differential privacy", Algorithm 1); the ``1e-6`` keeps the factor finite for a zero gradient and
makes a clipped gradient's norm strictly below ``C``.
"""

from typing import List, Optional, Sequence

import torch

CLIP_EPS = 1e-6

# Squares of half-precision gradients overflow (float16: |g| > 256) or lose the small terms
# (bfloat16 has an 8-bit mantissa): norms are accumulated and returned in float32.
_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-sample norms of ``dtype`` gradients are computed in (float32 for halves)."""
    return torch.float32 if dtype in _REDUCED_PRECISION else dtype


def per_sample_param_norms(grad_sample: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` L2 norms of one parameter's per-sample gradients ``(batch, *param.shape)``."""
    dtype = norm_dtype(grad_sample.dtype)
    if grad_sample.dim() == 1:  # a 0-d parameter: each sample's gradient is a scalar
        return grad_sample.abs().to(dtype)
    return torch.linalg.vector_norm(
        grad_sample, ord=2, dim=tuple(range(1, grad_sample.dim())), dtype=dtype
    )


def check_batch_sizes(grad_samples: Sequence[torch.Tensor]) -> int:
    """The common batch size (dim 0) of ``grad_samples``; a clear error if they disagree."""
    sizes = {g.shape[0] for g in grad_samples}
    if len(sizes) > 1:
        raise ValueError(
            f"per-sample gradients disagree on the batch size (dim 0): {sorted(sizes)}. Every "
            "trainable parameter must have one gradient per sample of the same batch; check that "
            "the model is wrapped in GradSampleModule with the right batch_first."
        )
    return sizes.pop() if sizes else 0


# ``bookkeeping[k]``: None, or ``(norms, clipped_sum)`` computed by the hooks for exactly
# ``grad_samples[k]``: its ``(batch,)`` per-sample norms and, if not None, a function with
# ``clipped_sum(factors) == sum_i factors[i] * grad_samples[k][i]`` computed from the layer's
# activations and backprops (Bu et al. 2023, book-keeping; the hooks use ghost clipping's
# clipped-sum samplers for it).  Both spare a pass over the per-sample gradient; they must be
# exact, or the clipping bound does not hold.
Bookkeeping = Optional[Sequence[Optional[tuple]]]


def _entries(grad_samples: Sequence[torch.Tensor], bookkeeping: Bookkeeping) -> List:
    if bookkeeping is None:
        return [None] * len(grad_samples)
    if len(bookkeeping) != len(grad_samples):
        raise ValueError(
            f"got {len(bookkeeping)} book-keeping entries for {len(grad_samples)} per-sample "
            "gradients: pass one (or None) per parameter"
        )
    return list(bookkeeping)


def _param_norms(grad_samples: Sequence[torch.Tensor], entries: List) -> List[torch.Tensor]:
    return [per_sample_param_norms(g) if e is None else e[0] for g, e in zip(grad_samples, entries)]


def _clipped_sum(factors: torch.Tensor, grad_sample: torch.Tensor, entry) -> torch.Tensor:
    if entry is None or entry[1] is None:
        return weighted_sum(factors, grad_sample)
    out = entry[1](factors)  # None: the book-kept inputs changed since the backward pass
    if out is None:
        return weighted_sum(factors, grad_sample)
    return out.reshape(grad_sample.shape[1:])


def per_sample_norms(
    grad_samples: Sequence[torch.Tensor], bookkeeping: Bookkeeping = None
) -> torch.Tensor:
    """``(batch,)`` norms of the whole per-sample gradient (all parameters flattened together).

    Computed as the L2 norm of the per-parameter norms, stacked: ``||g|| = ||(||g_1||, ...)||``.
    ``bookkeeping``: optional exact per-parameter norms from the hooks (see ``Bookkeeping``).
    """
    check_batch_sizes(grad_samples)
    return stack_norms(_param_norms(grad_samples, _entries(grad_samples, bookkeeping)))


def stack_norms(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Combine per-parameter ``(batch,)`` norms into the ``(batch,)`` norm of the concatenation."""
    if len(norms) == 0:
        raise ValueError("no per-sample norms to combine: the optimizer has no trainable params")
    dtype, device = norms[0].dtype, norms[0].device
    if all(n.dtype == dtype and n.device == device for n in norms):
        stacked = torch.stack(list(norms), dim=1)  # the usual case: no conversions to dispatch
    else:
        for n in norms[1:]:
            dtype = torch.promote_types(dtype, n.dtype)
        stacked = torch.stack([n.to(device=device, dtype=dtype) for n in norms], dim=1)
    return torch.linalg.vector_norm(stacked, ord=2, dim=1)


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, C / (norm + 1e-6))`` per sample."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def weighted_sum(factors: torch.Tensor, grad_sample: torch.Tensor) -> torch.Tensor:
    """``sum_i factors[i] * grad_sample[i]``, shape ``param.shape``, without a clipped copy."""
    f = factors.to(device=grad_sample.device, dtype=grad_sample.dtype)
    return torch.einsum("i,i...->...", f, grad_sample)


def flat_clipped_sums(
    grad_samples: Sequence[torch.Tensor],
    max_grad_norm: float,
    bookkeeping: Bookkeeping = None,
) -> List[torch.Tensor]:
    """Clip each sample's whole gradient to ``max_grad_norm``; sum over the batch, per param.

    ``bookkeeping``: optional exact norms / factors from the hooks (see ``Bookkeeping``).
    """
    check_batch_sizes(grad_samples)
    entries = _entries(grad_samples, bookkeeping)
    factors = clip_factors(stack_norms(_param_norms(grad_samples, entries)), max_grad_norm)
    return [_clipped_sum(factors, g, e) for g, e in zip(grad_samples, entries)]


def per_layer_clipped_sums(
    grad_samples: Sequence[torch.Tensor],
    max_grad_norms: Sequence[float],
    bookkeeping: Bookkeeping = None,
) -> List[torch.Tensor]:
    """Clip each sample's gradient of parameter ``k`` to ``max_grad_norms[k]``; sum per param.

    The concatenated clipped gradient then has norm at most ``||max_grad_norms||_2``: that is the
    sensitivity the noise must cover (McMahan et al. 2018, "A general approach to adding
    differential privacy to iterative training procedures", per-layer clipping).
    ``bookkeeping``: optional exact norms / factors from the hooks (see ``Bookkeeping``).
    """
    if len(grad_samples) != len(max_grad_norms):
        raise ValueError(
            f"per-layer clipping got {len(max_grad_norms)} max_grad_norm values for "
            f"{len(grad_samples)} trainable parameters: pass one value per parameter"
        )
    check_batch_sizes(grad_samples)
    entries = _entries(grad_samples, bookkeeping)
    norms = _param_norms(grad_samples, entries)
    return [
        _clipped_sum(clip_factors(n, c), g, e)
        for g, n, c, e in zip(grad_samples, norms, max_grad_norms, entries)
    ]


def unclipped_count(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Number of samples whose gradient norm is at most the clip bound (Andrew et al. 2021, b_i)."""
    return (norms <= max_grad_norm).sum()

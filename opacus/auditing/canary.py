"""Dirac gradient canaries for white-box auditing of DP-SGD (Nasr et al. 2021, 2023).

A canary is an extra "sample" whose per-sample gradient is ``canary_norm * e_k``: all zeros except
coordinate ``k`` of a dedicated canary parameter. It is inserted into the optimizer's per-sample
gradients after ``backward`` and before ``step``, so it goes through exactly the library's
clipping, summation and noise. Because no real sample has a gradient on the canary parameter, the
observed update of coordinate ``k`` is ``(clipped canary) + N(0, (sigma C)^2)`` if the canary was
in the batch and pure noise otherwise: the best case for the auditor, and hence the tightest
white-box audit of the optimizer.

The canary parameter lives in :class:`CanaryModule`, a wrapper that adds it to any model without
changing the model's outputs (its contribution to the output is multiplied by zero, so the
per-sample gradients computed by ``GradSampleModule`` for it are exactly zero).
"""

from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["CanaryModule", "dirac_canary_gradients", "insert_canary_gradients"]


class CanaryModule(nn.Module):
    """``model`` plus a dedicated canary parameter ``canary.weight`` of ``num_canaries`` entries.

    ``forward`` returns ``model(*args, **kwargs) + 0 * canary(zeros).sum()``: the same output
    as ``model``, while ``canary`` is a trainable ``nn.Linear(num_canaries, 1, bias=False)``
    (initialised to zero) that ``GradSampleModule`` sees as an ordinary layer with zero per-sample
    gradients. The model's output must be a tensor. ``batch_dim`` says where the batch is in
    the first positional input (0 for ``batch_first=True``, 1 otherwise).
    """

    def __init__(self, model: nn.Module, num_canaries: int, *, batch_dim: int = 0):
        super().__init__()
        if num_canaries < 1:
            raise ValueError(
                f"opacus.auditing.CanaryModule: num_canaries must be >= 1, got {num_canaries}"
            )
        self.model = model
        self.batch_dim = batch_dim
        self.canary = nn.Linear(num_canaries, 1, bias=False)
        nn.init.zeros_(self.canary.weight)

    @property
    def num_canaries(self) -> int:
        """Number of canary coordinates, i.e. the size of ``canary.weight`` (shape ``(1, n)``)."""
        return self.canary.in_features

    def forward(self, *args, **kwargs):
        """Run the wrapped model and add a zero-valued term that touches the canary layer.

        Args:
            *args, **kwargs: Passed unchanged to ``model``. The batch size is read from
                ``args[0].shape[batch_dim]`` when the first positional input is a tensor, else 1.

        Returns:
            The model's output tensor, numerically unchanged; the canary layer takes part in the
            graph so ``GradSampleModule`` computes its (zero) per-sample gradients.

        Raises:
            TypeError: If the model does not return a tensor.
        """
        out = self.model(*args, **kwargs)
        if not torch.is_tensor(out):
            raise TypeError(
                "opacus.auditing.CanaryModule: the audited model must return a tensor, got "
                f"{type(out).__name__}; wrap it so that forward returns the tensor the loss uses"
            )
        batch = args[0].shape[self.batch_dim] if args and torch.is_tensor(args[0]) else 1
        w = self.canary.weight
        zeros = torch.zeros(batch, self.num_canaries, dtype=w.dtype, device=w.device)
        return out + 0.0 * self.canary(zeros).sum()


def dirac_canary_gradients(
    included: torch.Tensor, canary_norm: float, *, dtype=None, device=None
) -> torch.Tensor:
    """Per-sample gradients of the canaries flagged in ``included`` (a ``(num_canaries,)`` bool).

    Returns ``(n, 1, num_canaries)`` (the shape of ``canary.weight`` per sample) with row ``j``
    equal to ``canary_norm * e_k`` for the ``j``-th included canary ``k``.
    """
    included = torch.as_tensor(included, dtype=torch.bool).flatten()
    idx = torch.nonzero(included, as_tuple=False).flatten()
    rows = torch.zeros(len(idx), 1, included.numel(), dtype=dtype, device=device)
    rows[torch.arange(len(idx)), 0, idx] = canary_norm
    return rows


def _last_chunk(gs):
    return gs[-1] if isinstance(gs, (list, tuple)) else gs


def _replace_last_chunk(gs, new):
    if isinstance(gs, (list, tuple)):
        return list(gs[:-1]) + [new]
    return new


def insert_canary_gradients(
    params: Sequence[torch.Tensor],
    canary_param: torch.Tensor,
    canary_rows: torch.Tensor,
    *,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Add ``canary_rows`` as extra samples to the per-sample gradients of ``params``.

    ``canary_param`` gets ``canary_rows`` (shape ``(n, *canary_param.shape)``), every other
    parameter ``n`` zero rows. The new rows are scattered at random positions among the existing
    rows (one permutation shared by all parameters, as for a real sample in a batch), so a bug that
    mixes neighbouring samples meets the canaries too. Works on ``p.grad_sample`` tensors and on
    lists of accumulated chunks (the rows join the last chunk).
    """
    n = canary_rows.shape[0]
    if n == 0:
        return
    if not any(p is canary_param for p in params):
        raise ValueError(
            "opacus.auditing.insert_canary_gradients: the canary parameter is not among the "
            "optimizer's parameters; build the optimizer on CanaryModule.parameters()"
        )
    batch = None
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise ValueError(
                "opacus.auditing: a trainable parameter has no p.grad_sample after backward. The "
                "gradient-canary audit needs materialised per-sample gradients: use "
                "grad_sample_mode 'hooks', 'functorch' or 'ew' (not 'ghost')"
            )
        b = _last_chunk(gs).shape[0]
        if batch is not None and b != batch:
            raise ValueError(
                f"opacus.auditing: per-sample gradients disagree on the batch size ({batch} vs {b})"
            )
        batch = b
    device = _last_chunk(canary_param.grad_sample).device
    perm = torch.randperm(batch + n, generator=generator).to(device)
    for p in params:
        last = _last_chunk(p.grad_sample)
        if p is canary_param:
            extra = canary_rows.to(dtype=last.dtype, device=last.device)
        else:
            extra = last.new_zeros((n, *last.shape[1:]))
        merged = torch.cat([last, extra], dim=0).index_select(0, perm)
        p.grad_sample = _replace_last_chunk(p.grad_sample, merged)

"""``DPPerLayerOptimizer``: one clip bound per parameter (per-layer clipping).

Each parameter's per-sample gradient is clipped to its own bound ``C_k``; the concatenated clipped
gradient then has norm at most ``C = ||(C_1, ..., C_K)||_2``, so the noise std is
``noise_multiplier * C`` on every coordinate (McMahan et al. 2018).
"""

import math
from typing import List, Optional, Sequence

import torch
from torch.optim import Optimizer

from opacus.optimizers import clipping
from opacus.optimizers.optimizer import DPOptimizer, _real_scalar
from opacus.optimizers.utils import params


def validated_per_layer_norms(optimizer: Optimizer, max_grad_norm: Sequence[float]) -> List[float]:
    """``max_grad_norm`` as a list of floats, one positive bound per trainable parameter."""
    if not isinstance(max_grad_norm, (list, tuple)):
        raise TypeError(
            "per-layer clipping takes max_grad_norm as a list with one bound per trainable "
            f"parameter, got {type(max_grad_norm).__name__}; for one global bound use DPOptimizer"
        )
    n_params = len(params(optimizer))
    if len(max_grad_norm) != n_params:
        raise ValueError(
            f"per-layer clipping got {len(max_grad_norm)} max_grad_norm values for {n_params} "
            "trainable parameters: pass one value per parameter (in optimizer order)"
        )
    norms = [
        _real_scalar(c, f"max_grad_norm[{k}]", "per-layer clipping")
        for k, c in enumerate(max_grad_norm)
    ]
    if not all(c > 0 for c in norms):
        raise ValueError(f"every per-layer max_grad_norm must be > 0, got {norms}")
    return norms


def _get_total_norm(self) -> float:
    """L2 norm of the per-layer bounds: the sensitivity of the concatenated clipped gradient."""
    return math.sqrt(sum(c * c for c in self.max_grad_norms))


def _set_total_norm(self, value: float) -> None:
    # Setting the total bound (e.g. from a grad-clip scheduler) rescales every per-layer bound by
    # the same factor, so the noise std (noise_multiplier * total) stays matched to the clipping.
    value = _real_scalar(value, "max_grad_norm", type(self).__name__)
    if not value > 0:
        raise ValueError(f"{type(self).__name__}: max_grad_norm must be > 0, got {value}")
    scale = value / _get_total_norm(self)
    self.max_grad_norms = [c * scale for c in self.max_grad_norms]


# Shared by DPPerLayerOptimizer and DistributedPerLayerOptimizer (whose public bases differ).
per_layer_max_grad_norm = property(
    _get_total_norm,
    _set_total_norm,
    doc="L2 norm of the per-layer bounds (the sensitivity); setting it rescales every bound.",
)


class DPPerLayerOptimizer(DPOptimizer):
    """``DPOptimizer`` with one clip bound per trainable parameter (``max_grad_norm`` is a list).

    ``max_grad_norms`` holds the per-parameter bounds; ``max_grad_norm`` is their L2 norm.

    Args:
        optimizer: the optimizer to wrap; its ``step`` runs on the private (clipped and noised)
            gradients.
        noise_multiplier: sigma: the noise standard deviation divided by ``max_grad_norm``.
        max_grad_norm: a list with the clipping norm of each parameter, in the order of the
            optimizer's parameters.
        expected_batch_size: the expected number of examples per logical batch (``sample_rate *
            len(dataset)``); the noised sum is divided by it when ``loss_reduction="mean"``. May be
            None only with ``loss_reduction="sum"``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the examples of a batch.
        generator: a ``torch.Generator`` for the noise (reproducible runs); None uses torch's
            default.
        secure_mode: draw the noise from a cryptographically secure source (no ``generator`` then).
    """

    max_grad_norm = per_layer_max_grad_norm

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: List[float],
        expected_batch_size: Optional[int],
        loss_reduction: str = "mean",
        generator=None,
        secure_mode: bool = False,
        **kwargs,
    ):
        self.max_grad_norms = validated_per_layer_norms(optimizer, max_grad_norm)
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=_get_total_norm(self),
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
            secure_mode=secure_mode,
            **kwargs,
        )

    def _clipped_sums(
        self, grad_samples: List[torch.Tensor], params: Sequence[torch.Tensor]
    ) -> List[torch.Tensor]:
        """Clip parameter ``k``'s per-sample gradients to ``max_grad_norms[k]``; sum each."""
        return clipping.per_layer_clipped_sums(
            grad_samples, self.max_grad_norms, self._bookkeeping(grad_samples, params)
        )

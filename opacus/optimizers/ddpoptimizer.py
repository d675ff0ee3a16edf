"""``DistributedDPOptimizer``: DP-SGD with data parallelism (the sum lives across processes).

Each rank clips its own samples into ``summed_grad``; only rank 0 adds the noise (once for the
whole logical batch), every rank divides by its own ``expected_batch_size`` (the per-rank expected
batch size), and the gradients are all-reduced.  For ``loss_reduction="mean"`` the reduced sum is
divided by the world size: ``(sum_r S_r + noise) / (expected_batch_size * world_size)``, i.e. the
noisy clipped sum over the global batch divided by the global expected batch size.
"""

from typing import Optional

from torch.optim import Optimizer

from opacus.optimizers.optimizer import DPOptimizer
from opacus.optimizers.reduction import DataParallelSteps


class DistributedDPOptimizer(DataParallelSteps, DPOptimizer):
    """``DPOptimizer`` for ``torch.distributed`` data parallelism (model wrapped in ``DPDDP``).

    Args:
        optimizer: the optimizer to wrap; its ``step`` runs on the private (clipped and noised)
            gradients.
        noise_multiplier: sigma: the noise standard deviation divided by ``max_grad_norm``.
        max_grad_norm: the L2 norm each per-sample gradient is clipped to.
        expected_batch_size: the expected number of examples per logical batch (``sample_rate *
            len(dataset)``); the noised sum is divided by it when ``loss_reduction="mean"``. May be
            None only with ``loss_reduction="sum"``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the examples of a batch.
        generator: a ``torch.Generator`` for the noise (reproducible runs); None uses torch's
            default.
        secure_mode: draw the noise from a cryptographically secure source (no ``generator`` then).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: Optional[int],
        loss_reduction: str = "mean",
        generator=None,
        secure_mode: bool = False,
        **kwargs,
    ):
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
            secure_mode=secure_mode,
            **kwargs,
        )
        self._init_data_parallel()

"""``DistributedDPOptimizerFastGradientClipping``: ghost clipping with data parallelism.

Same reduction as ``DistributedDPOptimizer`` (optimizers/reduction): each rank's clipped sum comes
from its double backward, rank 0 alone adds the noise, and the gradients are all-reduced at step.
"""

from typing import Optional

from torch.optim import Optimizer

from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.optimizers.reduction import DataParallelSteps


class DistributedDPOptimizerFastGradientClipping(
    DataParallelSteps, DPOptimizerFastGradientClipping
):
    """``DPOptimizerFastGradientClipping`` for ``torch.distributed`` data parallelism."""

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

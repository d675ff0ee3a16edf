"""``DistributedDPOptimizerFastGradientClipping``: ghost clipping with data parallelism.

Same reduction as ``DistributedDPOptimizer`` (optimizers/reduction): each rank's clipped sum comes
from its double backward, rank 0 alone adds the noise, and the gradients are all-reduced at step.
"""

from typing import Callable, Optional

import torch
from torch.optim import Optimizer

from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.optimizers.reduction import process_group_info, reduce_gradients


class DistributedDPOptimizerFastGradientClipping(DPOptimizerFastGradientClipping):
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
        self.rank, self.world_size = process_group_info(type(self).__name__)

    def add_noise(self):
        """Rank 0 adds the noise; the other ranks pass their clipped sum through."""
        if self.rank == 0:
            super().add_noise()
        else:
            for i, p in enumerate(self.params):
                p.grad = self._summed_grad_of(p, i).clone().view_as(p)

    def reduce_gradients(self):
        """All-reduce (sum) ``p.grad``; average over ranks for ``loss_reduction="mean"``."""
        reduce_gradients(self.params, self.loss_reduction, self.world_size)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[torch.Tensor]:
        """Accumulate, noise (rank 0), scale, all-reduce, then the wrapped optimizer's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_step():
            self.reduce_gradients()
            result = self.original_optimizer.step()
            return loss if result is None else result
        return None

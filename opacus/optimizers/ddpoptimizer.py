"""``DistributedDPOptimizer``: DP-SGD with data parallelism (the sum lives across processes).

Each rank clips its own samples into ``summed_grad``; only rank 0 adds the noise (once for the
whole logical batch), every rank divides by its own ``expected_batch_size`` (the per-rank expected
batch size), and the gradients are all-reduced.  For ``loss_reduction="mean"`` the reduced sum is
divided by the world size: ``(sum_r S_r + noise) / (expected_batch_size * world_size)``, i.e. the
noisy clipped sum over the global batch divided by the global expected batch size.
"""

from typing import Callable, Optional

import torch
from torch.optim import Optimizer

from opacus.optimizers.optimizer import DPOptimizer
from opacus.optimizers.reduction import process_group_info, reduce_gradients


class DistributedDPOptimizer(DPOptimizer):
    """``DPOptimizer`` for ``torch.distributed`` data parallelism (model wrapped in ``DPDDP``)."""

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
        """Clip, noise (rank 0), scale, all-reduce, then the wrapped optimizer's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_step():
            self.reduce_gradients()
            result = self.original_optimizer.step()
            return loss if result is None else result
        return None

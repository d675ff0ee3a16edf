"""``FSDPOptimizerFastGradientClipping``: ghost clipping with fully sharded data parallelism.

Under FSDP each rank owns a shard of every parameter, and ``p.grad`` (a ``DTensor`` for FSDP2) is
the shard of the gradient *averaged* over the ranks by FSDP's reduce-scatter.  With ghost
clipping each rank's backward already produced its clipped sum ``S_r``, so the local shard holds
``(1 / W) sum_r S_r``.  This optimizer multiplies it back by ``W`` (the cross-rank clipped sum),
adds ``N(0, (noise_multiplier * max_grad_norm)^2)`` to the coordinates of its own shard — the shards
are disjoint, so every coordinate of the model is noised exactly once — and for
``loss_reduction="mean"`` divides by the global expected batch size
``expected_batch_size * W`` (``expected_batch_size`` is per rank, as for DDP).

The noise of different shards must be independent: a user ``generator`` must be seeded
differently on each rank (secure mode seeds each rank from the OS CSPRNG).
"""

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from opacus.optimizers.consumed import mark_consumed
from opacus.optimizers.noise import with_gaussian_noise
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a ``DTensor`` (a view: in-place writes reach ``t``); else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


class FSDPOptimizerFastGradientClipping(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` for FSDP-sharded parameters (module docstring).

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
        generator: Optional[torch.Generator] = None,
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
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if distributed else 1

    def accumulate(self):
        """Add ``W * local shard of p.grad`` (the cross-rank clipped sum) to ``summed_grad``."""
        self._check_release_once()
        for i, p in enumerate(self.params):
            clipped_sum = local_shard(self._clipped_sum_of(p, i)).detach() * self.world_size
            if getattr(p, "summed_grad", None) is None:
                p.summed_grad = clipped_sum
            else:
                p.summed_grad.add_(clipped_sum)
            mark_consumed(p.grad)

    def add_noise(self):
        """Write ``summed_grad + N(0, (noise_multiplier * max_grad_norm)^2)`` into the shard."""
        sums = [self._summed_grad_of(p, i) for i, p in enumerate(self.params)]
        for i, noisy in with_gaussian_noise(
            self._noise_std(), sums, generator=self.generator, secure_mode=self.secure_mode
        ):
            with torch.no_grad():
                local_shard(self.params[i].grad).copy_(noisy)

    def scale_grad(self):
        """For ``"mean"``: divide by the global expected batch size ``expected_batch_size * W``."""
        if self.loss_reduction == "mean":
            denominator = self.expected_batch_size * self.accumulated_iterations * self.world_size
            for p in self.params:
                with torch.no_grad():
                    local_shard(p.grad).div_(denominator)

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Accumulate the shard; unless skipped, noise, scale and run the step hook.

        Args:
            closure: unused; accepted for the ``Optimizer.step`` interface.

        Returns:
            True if the wrapped optimizer should step (False while accumulating virtual steps).
        """
        return super().pre_step(closure)

    def zero_grad(self, set_to_none: bool = False):
        """Clear ``grad`` (and ``summed_grad`` unless the last step was skipped).

        Args:
            set_to_none: set the gradients to None instead of zeroing them.
        """
        super().zero_grad(set_to_none)

"""Where the sum lives: the cross-process reduction used by the distributed optimizers.

Each process clips its own samples; the clipped sums are then added across processes with one
``all_reduce`` per (device, dtype) bucket, so the number of collectives does not grow with the
number of parameters.
"""

from collections import defaultdict
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def process_group_info(who: str) -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group; a clear error if there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{who} needs torch.distributed: call torch.distributed.init_process_group(...) in "
            "every process before building the optimizer (or use the non-distributed optimizer)"
        )
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """In place: every tensor becomes its sum over all processes (one collective per bucket)."""
    buckets = defaultdict(list)
    for t in tensors:
        buckets[(t.device, t.dtype)].append(t)
    for group in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def reduce_gradients(params: Sequence[torch.Tensor], loss_reduction: str, world_size: int) -> None:
    """Sum ``p.grad`` over processes; for ``"mean"`` divide by the world size.

    Each rank's ``p.grad`` is ``(S_r [+ noise on rank 0]) / B_local``, so the average over ranks is
    the noisy clipped sum of the global batch over the global expected batch size
    ``B_local * world_size``.  For ``"sum"`` the plain sum is already right.
    """
    grads = [p.grad for p in params]
    all_reduce_sum(grads)
    if loss_reduction == "mean":
        for g in grads:
            g /= world_size


class DataParallelSteps:
    """Mixin for a DP optimizer whose processes each hold a slice of the batch (data parallelism).

    Each rank clips (or double-backwards) its own samples; rank 0 alone adds the noise, so the sum
    over ranks carries the noise once; ``step`` then all-reduces ``p.grad`` before the wrapped
    optimizer's step. Put it before the single-process DP optimizer in the bases and call
    ``_init_data_parallel()`` at the end of ``__init__``.
    """

    def _init_data_parallel(self) -> None:
        self.rank, self.world_size = process_group_info(type(self).__name__)

    def _noise_std(self) -> float:
        """Rank 0 adds the noise; the other ranks release their clipped sum as it is."""
        return super()._noise_std() if self.rank == 0 else 0.0

    def reduce_gradients(self):
        """All-reduce (sum) ``p.grad``; average over ranks for ``loss_reduction="mean"``."""
        reduce_gradients(self.params, self.loss_reduction, self.world_size)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[torch.Tensor]:
        """Clip or accumulate, noise (rank 0), scale, all-reduce, then the wrapped step.

        Args:
            closure: recomputes the loss (run with gradients enabled), as in ``Optimizer.step``.

        Returns:
            the closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_step():
            self.reduce_gradients()
            result = self.original_optimizer.step()
            return loss if result is None else result
        return None

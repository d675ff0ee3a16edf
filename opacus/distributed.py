"""Data-parallel wrapper for DP training.

Unlike ``torch.nn.parallel.DistributedDataParallel`` it registers no gradient hooks: with DP the
gradients to reduce across ranks are the *clipped* per-sample gradient sums, which only exist in
the optimizer (``DistributedDPOptimizer`` all-reduces them and rank 0 alone adds the noise).
A model wrapped in torch's ``DistributedDataParallel`` instead gets the same treatment from
``PrivacyEngine.make_private``: DDP's own all-reduce of the raw gradients is switched off
(``require_backward_grad_sync = False``, as inside ``no_sync()``), so ranks that run different
numbers of backward passes (Poisson batches split by ``BatchMemoryManager``) stay in step.
"""

import torch.distributed as dist
import torch.nn as nn


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def average_gradients(model: nn.Module) -> None:
    """All-reduce ``p.grad`` of every trainable parameter and divide by the world size.

    Args:
        model: the model whose parameters' ``grad`` are averaged over the processes.
    """
    if not _is_distributed():
        return
    world_size = dist.get_world_size()
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size


class DifferentiallyPrivateDistributedDataParallel(nn.Module):
    """Wrap ``model`` for data-parallel DP training.

    At construction every parameter and buffer is broadcast from rank 0, so all replicas start
    equal; ``forward`` is ``model.forward``. Gradient synchronisation is left to the DP optimizer.

    Args:
        model: the model to wrap; its parameters and buffers are replaced by rank 0's.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model
        if _is_distributed():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)

    def forward(self, *args, **kwargs):
        """Call the wrapped model: ``self.module(*args, **kwargs)``, with no gradient hooks."""
        return self.module(*args, **kwargs)

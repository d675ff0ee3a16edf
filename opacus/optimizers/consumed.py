"""Release-once bookkeeping: every per-sample gradient and every clipped sum is used by one step.

DP-SGD's guarantee assumes each batch's clipped sum enters exactly one released (noised) update.
Misuse breaks that silently: a second ``optimizer.step()`` after one backward, a forgotten
``optimizer.zero_grad()``, or ``model.zero_grad()`` (which leaves the optimizer's ``summed_grad``
behind) would release an old batch again, so a sample's influence grows past the clipping bound
while the accountant counts it once.

The optimizer therefore marks what it consumed: the per-sample tensors it clipped (``grad_sample``
chunks, ghost clipping's clipped ``p.grad``) and the ``summed_grad`` it noised. Clearing them
(``optimizer.zero_grad()``) is the only way to start afresh; any stage that meets a marked tensor
raises instead of releasing it again. The mark lives on the tensor object itself, so it holds
whatever path (``nn.Module.zero_grad``, ``set_to_none``, a second ``step``) left the tensor in
place, and a fresh tensor from the next backward pass is never marked.
"""

from typing import Iterable, Union

import torch

__all__ = ["check_fresh", "is_consumed", "mark_consumed"]

_CONSUMED_ATTR = "_opacus_consumed"

_TensorOrChunks = Union[torch.Tensor, Iterable[torch.Tensor], None]


def _tensors(obj: _TensorOrChunks):
    if obj is None:
        return
    if torch.is_tensor(obj):
        yield obj
        return
    for t in obj:
        if t is not None:
            yield t


def mark_consumed(obj: _TensorOrChunks) -> None:
    """Mark a tensor (or every chunk of a list of tensors) as used by a step."""
    if isinstance(obj, torch.Tensor):  # the common case, without the generator
        setattr(obj, _CONSUMED_ATTR, True)
        return
    for t in _tensors(obj):
        setattr(t, _CONSUMED_ATTR, True)


def is_consumed(obj: _TensorOrChunks) -> bool:
    """True if the tensor, or any chunk of a list of tensors, was already used by a step."""
    if obj is None:
        return False
    if isinstance(obj, torch.Tensor):  # the common case, without the generator
        return bool(getattr(obj, _CONSUMED_ATTR, False))
    return any(getattr(t, _CONSUMED_ATTR, False) for t in _tensors(obj))


def check_fresh(obj: _TensorOrChunks, *, owner: str, what: str) -> None:
    """Raise ``ValueError`` if ``obj`` was already consumed by an earlier step.

    Args:
        obj: a tensor or a list of tensor chunks (``p.grad_sample`` after several passes).
        owner: the class raising (e.g. ``"DPOptimizer"``), named in the message.
        what: what was found consumed (e.g. ``"p.grad_sample"``, ``"p.summed_grad"``).
    """
    if is_consumed(obj):
        raise ValueError(
            f"{owner}: {what} was already used by an earlier optimizer step. Releasing it again "
            "would count the same samples twice and break the differential-privacy guarantee. "
            "Call optimizer.zero_grad() every step (after optimizer.step(), before the next "
            "backward pass); model.zero_grad() does not clear the optimizer's clipped sum, and "
            "optimizer.step() may run only once per backward pass."
        )

"""Per-sample gradient buffers reused across steps (CPU only).

A per-sample gradient is ``batch`` times the size of its parameter: tens of megabytes for an
ordinary layer.  glibc serves blocks that large with a fresh ``mmap`` and unmaps them on free, so
every step pays a page fault (and the kernel's zeroing) for each 4 KiB page it writes: measured
at ~30 ms for a (64, 512, 512) float32 tensor on one core, against ~5 ms for writing the same
values into memory that is already mapped.  The CUDA caching allocator avoids this on GPUs; on
CPU the samplers write into a buffer kept per (layer, slot) and reuse it on the next step.

A buffer is reused only when nothing but the pool refers to its storage (no ``p.grad_sample``,
view or user reference still alive), so a tensor that has been handed out is never overwritten.
The pool is keyed weakly by the layer: the buffers go when the layer goes.
"""

import weakref
from typing import Dict, Sequence

import torch

# Below this size malloc recycles blocks itself (and the pool would only add bookkeeping).
MIN_POOLED_BYTES = 1 << 20

_pools: "weakref.WeakKeyDictionary[object, Dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


# A private torch API (present since 2.1); without it nothing is pooled.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _only_the_pool_holds(buf: torch.Tensor) -> bool:
    # The pool's tensor holds one reference and the temporary ``untyped_storage()`` another.
    return _storage_use_count(buf.untyped_storage()._cdata) == 2


def reusable_empty(
    owner: object,
    slot: str,
    shape: Sequence[int],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """An uninitialised tensor for ``owner``'s ``slot``: last step's buffer when it is free.

    Small tensors, non-CPU devices and grad mode (where ``out=`` would break autograd) get a
    plain ``torch.empty``.
    """
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    if (
        _storage_use_count is None
        or torch.device(device).type != "cpu"
        or numel * dtype.itemsize < MIN_POOLED_BYTES
        or torch.is_grad_enabled()
    ):
        return torch.empty(shape, dtype=dtype, device=device)
    try:
        pool = _pools.setdefault(owner, {})
    except TypeError:  # owner not weak-referenceable
        return torch.empty(shape, dtype=dtype, device=device)
    buf = pool.get(slot)
    if buf is not None and buf.shape == shape and buf.dtype == dtype and _only_the_pool_holds(buf):
        return buf.view(shape)
    buf = torch.empty(shape, dtype=dtype, device=device)
    buf._opacus_pooled = True  # marks the pool's own tensor, for ``is_unshared_buffer``
    pool[slot] = buf
    # Hand out a distinct tensor on the same storage: every holder of it then counts as a
    # reference to the storage, which ``_only_the_pool_holds`` sees.
    return buf.view(shape)


def is_unshared_buffer(t: torch.Tensor) -> bool:
    """True if ``t`` was handed out by :func:`reusable_empty` and no other tensor shares its
    storage (the pool's own tensor aside): writing into ``t`` in place then changes nothing that
    a user, autograd or another per-sample gradient can see.

    Any other tensor answers False: a sampler's output may alias a tensor autograd still owns.
    """
    base = t._base
    return (
        _storage_use_count is not None
        and base is not None
        and getattr(base, "_opacus_pooled", False)
        and not t.requires_grad
        # The pool's tensor, ``t`` and the temporary ``untyped_storage()``.
        and _storage_use_count(t.untyped_storage()._cdata) == 3
    )


def release_buffers() -> None:
    """Drop every pooled buffer (e.g. before measuring a step's peak memory)."""
    _pools.clear()

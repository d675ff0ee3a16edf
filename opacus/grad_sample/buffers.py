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

A sampler that writes only a few rows of a large zeroed buffer (an embedding's scatter) need not
zero all of it again: ``reusable_row_zeros`` zeroes only the rows that its previous call recorded
(``record_written_rows``) when that is provably enough: the same pooled buffer, and its
version counter unchanged since the record (no in-place write through any view of it).  Writes
that bypass autograd's version counter (through ``.data``, ``.numpy()`` or the storage) cannot
be seen: a ``p.grad_sample`` modified that way must not be released back to the pool (keep a
reference, or write into a copy).
"""

import weakref
from typing import Dict, Optional, Sequence

import torch

# Below this size malloc recycles blocks itself (and the pool would only add bookkeeping).
MIN_POOLED_BYTES = 1 << 20

_pools: "weakref.WeakKeyDictionary[object, Dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()
# ``owner -> {slot: (weakref to the pooled buffer, its _version after the writes, shape, rows)}``:
# the only non-zero entries of that buffer are in ``rows`` of its ``(N, shape[-1])`` view.
_scattered: "weakref.WeakKeyDictionary[object, Dict[str, tuple]]" = weakref.WeakKeyDictionary()


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


def _written_rows(owner: object, slot: str, out: torch.Tensor) -> Optional[torch.Tensor]:
    """The rows (of ``out`` seen as ``(N, D)``) that may hold non-zeros, or None if any may."""
    try:
        record = _scattered.get(owner, {}).pop(slot, None)
    except TypeError:  # owner not weak-referenceable
        return None
    if record is None:
        return None
    buf_ref, version, shape, rows = record
    base = out._base
    if base is None or buf_ref() is not base or base._version != version or out.shape != shape:
        return None
    return rows


def reusable_row_zeros(
    owner: object,
    slot: str,
    shape: Sequence[int],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """A zero tensor of ``shape`` for ``owner``'s ``slot`` (``reusable_empty``'s buffer).

    When it is the buffer of the previous call and ``record_written_rows`` described every
    write into it since it was last zero, only those rows are zeroed; otherwise all of it.
    """
    out = reusable_empty(owner, slot, shape, dtype=dtype, device=device)
    rows = _written_rows(owner, slot, out)
    if rows is None:
        return out.zero_()
    out.view(-1, out.shape[-1]).index_fill_(0, rows, 0)
    return out


def record_written_rows(owner: object, slot: str, out: torch.Tensor, rows: torch.Tensor) -> None:
    """After the last write into ``out`` (from ``reusable_row_zeros``): its non-zero entries all
    lie in the rows ``rows`` (1-D indices into ``out`` seen as ``(N, out.shape[-1])``).  A copy
    of ``rows`` is kept (the caller's tensor may change); any later in-place write into the
    buffer, through any view, moves its version counter and voids the record."""
    base = out._base
    if base is None or not out.is_contiguous():
        return  # not a pooled buffer: nothing to reuse
    try:
        slots = _scattered.setdefault(owner, {})
    except TypeError:
        return
    slots[slot] = (weakref.ref(base), base._version, out.shape, rows.detach().clone())


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
    _scattered.clear()

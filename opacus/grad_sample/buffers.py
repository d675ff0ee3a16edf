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
(``record_scattered_rows``) when that is provably enough: the same pooled buffer, and its
version counter unchanged since the record (no in-place write through any view of it).
"""

import weakref
from typing import Dict, Optional, Sequence

import torch

# Below this size malloc recycles blocks itself (and the pool would only add bookkeeping).
MIN_POOLED_BYTES = 1 << 20

_pools: "weakref.WeakKeyDictionary[object, Dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()
# ``owner -> {slot: (weakref to the pooled buffer, its _version after the writes, index)}``:
# the only non-zero entries of that buffer are the rows ``index`` selects on dim 1.
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
    pool[slot] = buf
    # Hand out a distinct tensor on the same storage: every holder of it then counts as a
    # reference to the storage, which ``_only_the_pool_holds`` sees.
    return buf.view(shape)


def _written_rows(owner: object, slot: str, out: torch.Tensor) -> Optional[torch.Tensor]:
    """The index of the rows ``out`` may hold non-zeros in, or None if anything else may."""
    try:
        record = _scattered.get(owner, {}).pop(slot, None)
    except TypeError:  # owner not weak-referenceable
        return None
    if record is None:
        return None
    buf_ref, version, index = record
    base = out._base
    if base is None or buf_ref() is not base or base._version != version:
        return None
    if index.shape[0] != out.shape[0]:
        return None
    return index


def reusable_row_zeros(
    owner: object,
    slot: str,
    shape: Sequence[int],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """A zero ``(B, rows, D)`` tensor for ``owner``'s ``slot`` (``reusable_empty``'s buffer).

    When it is the buffer of the previous call and ``record_scattered_rows`` described every
    write into it since it was last zero, only those rows are zeroed (``B x T x D`` elements
    instead of ``B x rows x D``); otherwise all of it.
    """
    out = reusable_empty(owner, slot, shape, dtype=dtype, device=device)
    index = _written_rows(owner, slot, out)
    if index is None:
        return out.zero_()
    return out.scatter_(1, index.unsqueeze(-1).expand(-1, -1, out.shape[2]), 0.0)


def record_scattered_rows(owner: object, slot: str, out: torch.Tensor, index: torch.Tensor) -> None:
    """After the last write into ``out`` (from ``reusable_row_zeros``): its non-zero entries all
    lie in the rows ``index`` (``(B, T)``) selects on dim 1.  A copy of ``index`` is kept (the
    caller's tensor may change); any later in-place write into the buffer voids the record."""
    base = out._base
    if base is None or out.dim() != 3:
        return  # not a pooled buffer: nothing to reuse
    try:
        slots = _scattered.setdefault(owner, {})
    except TypeError:
        return
    slots[slot] = (weakref.ref(base), base._version, index.detach().clone())


def release_buffers() -> None:
    """Drop every pooled buffer (e.g. before measuring a step's peak memory)."""
    _pools.clear()
    _scattered.clear()

"""Virtual batches: split each logical (Poisson) batch into physical batches that fit in memory.

Privacy depends only on the logical batch: the optimizer accumulates clipped per-sample gradients
over the physical batches of one logical batch and adds noise once, at the last of them. The
splitter tells it which physical batch closes a logical one through
``optimizer.signal_skip_step(do_skip=...)``: ``True`` for every chunk but the last.
"""

import math
from collections import deque
from typing import Iterator, List

from torch.utils.data import BatchSampler, DataLoader, Sampler

from opacus.data_loader import _worker_settings
from opacus.data_loader.samplers import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)
from opacus.optimizers.ddp_perlayeroptimizer import DistributedPerLayerOptimizer
from opacus.optimizers.optimizer import DPOptimizer

__all__ = [
    "BatchMemoryManager",
    "BatchSplittingSampler",
    "DPOptimizer",
    "DistributedUniformWithReplacementSampler",
    "UniformWithReplacementSampler",
    "wrap_data_loader",
]


def _check_max_batch_size(max_batch_size) -> int:
    if (
        not isinstance(max_batch_size, int)
        or isinstance(max_batch_size, bool)
        or (max_batch_size <= 0)
    ):
        raise ValueError(
            f"max_physical_batch_size={max_batch_size!r} must be a positive integer: the largest "
            "number of samples that fits in memory in one forward/backward pass."
        )
    return max_batch_size


def _check_steps_stay_in_step(data_loader: DataLoader, optimizer) -> None:
    # DistributedPerLayerOptimizer hands torch DDP one private gradient per backward pass
    # (zeros on virtual steps), and DDP all-reduces it: every rank must run the same number of
    # backward passes. Poisson batches of different sizes split into physical batches do not,
    # so DDP would pair one rank's real step with another's virtual one (un-noised releases).
    if isinstance(optimizer, DistributedPerLayerOptimizer) and isinstance(
        data_loader.batch_sampler,
        (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler),
    ):
        raise ValueError(
            "BatchMemoryManager cannot split Poisson batches for DistributedPerLayerOptimizer: "
            "it relies on torch DDP all-reducing every backward pass, and ranks would run "
            "different numbers of physical batches. Use clipping='flat', or per-layer clipping "
            "with grad_sample_mode='functorch' or 'ew' (SimpleDistributedPerLayerOptimizer "
            "all-reduces once per logical step), or train without BatchMemoryManager."
        )


def _split(indices: List[int], max_batch_size: int) -> List[List[int]]:
    # Balanced chunks (sizes differ by at most one), each <= max_batch_size.
    n_chunks = math.ceil(len(indices) / max_batch_size)
    base, extra = divmod(len(indices), n_chunks)
    chunks, start = [], 0
    for i in range(n_chunks):
        size = base + (1 if i < extra else 0)
        chunks.append(indices[start : start + size])
        start += size
    return chunks


class BatchSplittingSampler(Sampler[List[int]]):
    """Batch sampler yielding physical batches of at most ``max_batch_size`` indices.

    Each logical batch of ``sampler`` is split into balanced chunks; before each chunk is yielded
    the optimizer is told whether to skip the step that follows it (all chunks but the last). An
    empty logical batch yields one empty physical batch, which does take a step.

    Args:
        sampler: the batch sampler of logical batches.
        max_batch_size: the most indices in one physical batch.
        optimizer: the DP optimizer told which steps to skip.
    """

    def __init__(self, *, sampler: Sampler[List[int]], max_batch_size: int, optimizer: DPOptimizer):
        self.sampler = sampler
        self.max_batch_size = _check_max_batch_size(max_batch_size)
        self.optimizer = optimizer
        # When a loader drives this sampler it may prefetch indices ahead of the training loop
        # (num_workers > 0); it then asks for the skip signals to be queued and sends each one
        # when the matching batch reaches the user (see _SplitDataLoader).
        self._deferred_signals = None

    def _signal(self, do_skip: bool) -> None:
        if self._deferred_signals is not None:
            self._deferred_signals.append(do_skip)
        else:
            self.optimizer.signal_skip_step(do_skip=do_skip)

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.sampler:
            batch = list(batch)
            if len(batch) == 0:
                self._signal(False)
                yield []
                continue
            chunks = _split(batch, self.max_batch_size)
            for chunk in chunks[:-1]:
                self._signal(True)
                yield chunk
            self._signal(False)
            yield chunks[-1]

    def __len__(self) -> int:
        """Expected number of physical batches (exact for a fixed-size BatchSampler)."""
        if isinstance(self.sampler, BatchSampler):
            per_batch = math.ceil(self.sampler.batch_size / self.max_batch_size)
            return len(self.sampler) * per_batch
        if isinstance(
            self.sampler, (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler)
        ):
            expected = self.sampler.sample_rate * self.sampler.num_samples
            return len(self.sampler) * max(1, math.ceil(expected / self.max_batch_size))
        return len(self.sampler)


class _SplitDataLoader(DataLoader):
    """DataLoader over a BatchSplittingSampler that sends each skip signal with its batch."""

    def __iter__(self):
        splitter = self.batch_sampler
        splitter._deferred_signals = deque()
        try:
            for batch in super().__iter__():
                splitter.optimizer.signal_skip_step(do_skip=splitter._deferred_signals.popleft())
                yield batch
        finally:
            splitter._deferred_signals = None


def wrap_data_loader(*, data_loader: DataLoader, max_batch_size: int, optimizer: DPOptimizer):
    """A data loader yielding the same samples as ``data_loader`` in physical batches.

    Every logical batch is split into chunks of at most ``max_batch_size``; ``optimizer`` (a
    DPOptimizer) only takes a real step after the last chunk of each logical batch.

    Args:
        data_loader: the loader of logical batches.
        max_batch_size: the most examples in one physical batch.
        optimizer: the DP optimizer; it steps once per logical batch.

    Raises:
        ValueError: ``max_batch_size`` is not a positive integer, the loader has no batch sampler,
            or the optimizer cannot take split Poisson batches.
    """
    if data_loader.batch_sampler is None:
        raise ValueError(
            "The data loader has no batch sampler (batch_size=None): there are no logical "
            "batches to split."
        )
    _check_steps_stay_in_step(data_loader, optimizer)
    return _SplitDataLoader(
        dataset=data_loader.dataset,
        collate_fn=data_loader.collate_fn,
        generator=data_loader.generator,
        batch_sampler=BatchSplittingSampler(
            sampler=data_loader.batch_sampler,
            max_batch_size=max_batch_size,
            optimizer=optimizer,
        ),
        **_worker_settings(data_loader),
    )


class BatchMemoryManager:
    """Context manager giving a data loader of physical batches of at most a given size.

    Example::

        with BatchMemoryManager(data_loader=dl, max_physical_batch_size=32,
                                optimizer=optimizer) as physical_dl:
            for x, y in physical_dl:
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()  # real step only at the end of each logical batch

    Args:
        data_loader: the loader of logical (Poisson) batches.
        max_physical_batch_size: the most examples in one forward/backward pass.
        optimizer: the DP optimizer; it steps once per logical batch.
    """

    def __init__(
        self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer: DPOptimizer
    ):
        self.data_loader = data_loader
        self.max_physical_batch_size = _check_max_batch_size(max_physical_batch_size)
        self.optimizer = optimizer
        _check_steps_stay_in_step(data_loader, optimizer)

    def __enter__(self):
        return wrap_data_loader(
            data_loader=self.data_loader,
            max_batch_size=self.max_physical_batch_size,
            optimizer=self.optimizer,
        )

    def __exit__(self, exc_type, exc_value, traceback):
        return None

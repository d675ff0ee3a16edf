"""Poisson batch samplers for DP-SGD.

The privacy analysis of DP-SGD (Abadi et al. 2016; Mironov et al. 2019, "Rényi Differential Privacy
of the Sampled Gaussian Mechanism") assumes *Poisson* subsampling: every sample joins every batch
independently with probability ``q``. Batch sizes are therefore random (Binomial(n, q)) and may be
zero; the samplers below yield index lists of varying length, possibly empty.
"""

from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _check_sample_rate(sample_rate: float) -> None:
    if not (0.0 < float(sample_rate) <= 1.0):
        raise ValueError(
            f"sample_rate={sample_rate} is not a probability in (0, 1]: pass the probability "
            "with which each sample joins a batch (e.g. batch_size / len(dataset))."
        )


def _default_steps(sample_rate: float, steps: Optional[int]) -> int:
    if steps is not None:
        if int(steps) <= 0:
            raise ValueError(f"steps={steps} must be a positive number of batches per epoch.")
        return int(steps)
    # One epoch sees each sample once in expectation: 1/q batches.
    return max(1, int(round(1.0 / sample_rate)))


def _poisson_indices(
    candidates: torch.Tensor, sample_rate: float, generator: Optional[torch.Generator]
) -> List[int]:
    mask = torch.rand(candidates.numel(), generator=generator) < sample_rate
    return candidates[mask].tolist()


class UniformWithReplacementSampler(Sampler[List[int]]):
    """Batch sampler drawing Poisson batches: each index is in each batch with probability q.

    Batches are drawn independently of each other (hence "with replacement" across batches); one
    epoch is ``steps`` batches, ``round(1 / sample_rate)`` by default.
    """

    def __init__(self, *, num_samples: int, sample_rate: float, generator=None, steps=None):
        if int(num_samples) <= 0:
            raise ValueError(
                f"num_samples={num_samples}: the dataset must contain at least one sample."
            )
        _check_sample_rate(sample_rate)
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.generator = generator
        self.steps = _default_steps(self.sample_rate, steps)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        candidates = torch.arange(self.num_samples)
        for _ in range(self.steps):
            yield _poisson_indices(candidates, self.sample_rate, self.generator)


class DistributedUniformWithReplacementSampler(Sampler[List[int]]):
    """Poisson batch sampler for data-parallel training.

    The dataset is split into ``world_size`` disjoint shards (after an optional shuffle that is the
    same on every rank: it is seeded by ``shuffle_seed + epoch``); each rank Poisson-samples its own
    shard with rate ``sample_rate``. The union of the ranks' batches is then a Poisson sample of
    the whole dataset with the same rate, which is what the accountant assumes. Shards are not
    padded: duplicating a sample would double its sampling probability.
    """

    def __init__(
        self,
        *,
        total_size: int,
        sample_rate: float,
        shuffle: bool = True,
        shuffle_seed: int = 0,
        steps: int = None,
        generator=None,
    ):
        if int(total_size) <= 0:
            raise ValueError(
                f"total_size={total_size}: the dataset must contain at least one sample."
            )
        _check_sample_rate(sample_rate)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DistributedUniformWithReplacementSampler needs an initialised process group: "
                "call torch.distributed.init_process_group first, or use "
                "UniformWithReplacementSampler for single-process training."
            )
        self.total_size = int(total_size)
        self.sample_rate = float(sample_rate)
        self.shuffle = shuffle
        self.shuffle_seed = shuffle_seed
        self.generator = generator
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.epoch = 0
        # Size of this rank's shard: indices rank, rank + W, rank + 2W, ...
        self.num_samples = len(range(self.rank, self.total_size, self.world_size))
        self.steps = _default_steps(self.sample_rate, steps)

    def __len__(self) -> int:
        return self.steps

    def _shard(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.shuffle_seed + self.epoch)
            order = torch.randperm(self.total_size, generator=g)
        else:
            order = torch.arange(self.total_size)
        return order[self.rank : self.total_size : self.world_size]

    def __iter__(self) -> Iterator[List[int]]:
        shard = self._shard()
        for _ in range(self.steps):
            yield _poisson_indices(shard, self.sample_rate, self.generator)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the shards for ``epoch`` (same on all ranks, as DistributedSampler does)."""
        self.epoch = epoch

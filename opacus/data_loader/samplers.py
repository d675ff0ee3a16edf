"""Poisson batch samplers for DP-SGD.

The privacy analysis of DP-SGD (Abadi et al. 2016; Mironov et al. 2019, "Rényi Differential Privacy
of the Sampled Gaussian Mechanism") assumes *Poisson* subsampling: every sample joins every batch
independently with probability ``q``. Batch sizes are therefore random (Binomial(n, q)) and may be
zero; the samplers below yield batches of varying length, empty ones included.

One epoch is ``int(1 / q)`` batches (truncated, as ``get_noise_multiplier`` converts epochs to
steps): rounding up would take more steps per epoch than the noise was calibrated for.

The samplers sit beside the data loaders that use them; ``opacus.utils.uniform_sampler`` (their
Opacus 1.6 path) re-exports them.
"""

from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "CyclicPoissonSampler",
    "DistributedUniformWithReplacementSampler",
    "UniformWithReplacementSampler",
]


def _check_sample_rate(owner: str, sample_rate: float) -> float:
    if isinstance(sample_rate, bool) or not (0.0 < float(sample_rate) <= 1.0):
        raise ValueError(
            f"{owner}: sample_rate={sample_rate!r} is not a probability in (0, 1]: pass the "
            "probability with which each sample joins a batch (e.g. batch_size / len(dataset))."
        )
    return float(sample_rate)


def _batches_per_epoch(owner: str, sample_rate: float, steps: Optional[int]) -> int:
    if steps is not None:
        if isinstance(steps, bool) or int(steps) != steps or int(steps) <= 0:
            raise ValueError(
                f"{owner}: steps={steps!r} must be a positive whole number of batches per epoch "
                "(or None for int(1 / sample_rate))."
            )
        return int(steps)
    # One epoch sees each sample once in expectation; truncated, like the epochs-to-steps
    # conversion of noise calibration, so an epoch never has more steps than calibrated for.
    return int(1 / sample_rate)


class UniformWithReplacementSampler(Sampler[List[int]]):
    """Batch sampler drawing Poisson batches: each index is in each batch with probability q.

    Batches are drawn independently of each other (hence "with replacement" across batches) and
    are Python lists of indices, possibly empty. One epoch is ``steps`` batches,
    ``int(1 / sample_rate)`` by default.

    Attributes: ``num_samples``, ``sample_rate`` (the rate actually used: what the privacy
    accountant must record), ``generator``, ``steps``.

    Args:
        num_samples: the size of the dataset.
        sample_rate: the probability with which each sample joins each batch.
        generator: the ``torch.Generator`` of the draws.
        steps: batches per epoch (``int(1 / sample_rate)`` if None).

    Raises:
        ValueError: ``sample_rate`` is not in (0, 1], ``steps`` is not positive, or ``num_samples``
            is 0.
    """

    def __init__(self, *, num_samples: int, sample_rate: float, generator=None, steps=None):
        owner = type(self).__name__
        if int(num_samples) <= 0:
            raise ValueError(
                f"{owner}: num_samples={num_samples}: the dataset must contain at least one sample."
            )
        self.num_samples = int(num_samples)
        self.sample_rate = _check_sample_rate(owner, sample_rate)
        self.generator = generator
        self.steps = _batches_per_epoch(owner, self.sample_rate, steps)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps):
            # One uniform draw per sample: sample i joins iff u_i < q.
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().view(-1).tolist()


class DistributedUniformWithReplacementSampler(Sampler[torch.Tensor]):
    """Poisson batch sampler for data-parallel training.

    The rank and world size are read from the default process group (``torch.distributed``)
    once, in the constructor. The dataset is split into ``num_replicas`` disjoint shards: the
    indices are shuffled by a fresh generator seeded ``shuffle_seed + epoch`` (the same on every
    rank; kept in order with ``shuffle=False``), and rank ``r`` takes every ``num_replicas``-th
    one starting at ``r``. Each rank Poisson-samples its own shard with rate ``sample_rate``, so
    the union of the ranks' batches is a Poisson sample of the whole dataset with that rate, which
    is what the accountant assumes. Shards are not padded: duplicating a sample would double its
    sampling probability.

    Batches are 1-D int64 tensors of dataset indices. Empty batches are yielded too (as empty
    tensors), so that every rank takes exactly ``len(sampler)`` steps: the ranks' gradient
    all-reduces must pair up step by step (Opacus 1.6 skips them instead).

    Attributes: ``total_size``, ``sample_rate``, ``shuffle``, ``shuffle_seed``, ``generator``,
    ``num_replicas``, ``rank``, ``num_samples`` (this rank's shard size), ``num_batches``,
    ``epoch``.

    Args:
        total_size: the size of the whole dataset.
        sample_rate: the probability with which each sample joins each batch.
        shuffle: shuffle the indices before splitting them into shards.
        shuffle_seed: the seed of the shuffling (plus the epoch).
        steps: batches per epoch (``int(1 / sample_rate)`` if None).
        generator: the ``torch.Generator`` of the Poisson draws.

    Raises:
        ValueError: ``sample_rate`` is not in (0, 1], ``steps`` is not positive, or the dataset is
            empty.
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
        owner = type(self).__name__
        if int(total_size) <= 0:
            raise ValueError(
                f"{owner}: total_size={total_size}: the dataset must contain at least one sample."
            )
        self.total_size = int(total_size)
        self.sample_rate = _check_sample_rate(owner, sample_rate)
        self.shuffle = shuffle
        self.shuffle_seed = shuffle_seed
        self.generator = generator
        try:
            self.num_replicas = dist.get_world_size()
            self.rank = dist.get_rank()
        except (RuntimeError, ValueError) as err:
            if hasattr(err, "add_note"):
                err.add_note(
                    f"{owner} reads the rank and world size of the default process group: call "
                    "torch.distributed.init_process_group first, or use "
                    "UniformWithReplacementSampler for single-process training."
                )
            raise
        self.epoch = 0
        # Shard = positions rank, rank + W, rank + 2W, ...: lower ranks get one more when W does
        # not divide the dataset.
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))
        self.num_batches = _batches_per_epoch(owner, self.sample_rate, steps)

    def __len__(self) -> int:
        return self.num_batches

    def _shard(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.shuffle_seed + self.epoch)
            order = torch.randperm(self.total_size, generator=g)
        else:
            order = torch.arange(self.total_size)
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[torch.Tensor]:
        shard = self._shard()
        for _ in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield shard[mask]

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the shards for ``epoch`` (same on all ranks, as DistributedSampler does).

        Args:
            epoch: the epoch number.
        """
        self.epoch = epoch


class CyclicPoissonSampler(Sampler[List[int]]):
    """Cyclic Poisson sampling for banded matrix factorization (Choquette-Choo et al. 2023).

    The dataset is split once into ``bands`` disjoint groups (a random permutation from a
    generator seeded ``group_seed``, cut into ``bands`` chunks whose sizes differ by at most one;
    the split depends on nothing but ``num_samples``, ``bands`` and the seed). Step ``t`` (counted
    over the sampler's whole life, across epochs) Poisson-samples group ``t mod bands`` only: each
    of its samples joins the batch independently with probability ``sample_rate``; samples of
    the other groups have probability 0. With ``bands = 1`` this is Poisson sampling of the whole
    dataset (``UniformWithReplacementSampler``'s draws, from the same generator).

    The expected batch size is ``sample_rate * num_samples / bands``. One epoch (each sample seen
    once in expectation) is ``int(bands / sample_rate)`` steps by default.

    With ``distributed=True`` every group is split further over the ranks of the default process
    group (positions ``rank, rank + W, ...`` of the group): each rank Poisson-samples its share of
    the current group, so the union over the ranks is a Poisson sample of the group.

    Every yielded batch must be used for exactly one (logical) optimizer step: the privacy
    reduction needs the step count of the noise and of the sampler to stay aligned. ``step``
    (the number of batches drawn so far) is kept in :meth:`state_dict`.

    Attributes: ``num_samples``, ``sample_rate``, ``bands``, ``group_seed``, ``generator``,
    ``steps`` (batches per epoch), ``step``, ``groups`` (list of index tensors), ``rank``,
    ``num_replicas``.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        bands: int,
        group_seed: int = 0,
        generator=None,
        steps: Optional[int] = None,
        distributed: bool = False,
    ):
        owner = type(self).__name__
        if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
            raise ValueError(f"{owner}: bands must be an integer >= 1, got {bands!r}")
        if int(num_samples) < bands:
            raise ValueError(
                f"{owner}: num_samples={num_samples} is smaller than bands={bands}: every group "
                "needs at least one sample."
            )
        self.num_samples = int(num_samples)
        self.sample_rate = _check_sample_rate(owner, sample_rate)
        self.bands = bands
        self.group_seed = group_seed
        self.generator = generator
        if steps is None:
            steps = max(1, int(bands / self.sample_rate))
        self.steps = _batches_per_epoch(owner, self.sample_rate, steps)
        self.step = 0
        if distributed:
            self.num_replicas, self.rank = dist.get_world_size(), dist.get_rank()
        else:
            self.num_replicas, self.rank = 1, 0
        if bands == 1:
            order = torch.arange(self.num_samples)
        else:
            g = torch.Generator()
            g.manual_seed(group_seed)
            order = torch.randperm(self.num_samples, generator=g)
        self.groups = [
            chunk[self.rank :: self.num_replicas] for chunk in torch.tensor_split(order, bands)
        ]

    def group_of(self, step: int) -> int:
        """The group sampled at (life-long) step ``step``: ``step mod bands``."""
        return step % self.bands

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps):
            group = self.groups[self.group_of(self.step)]
            self.step += 1
            mask = torch.rand(len(group), generator=self.generator) < self.sample_rate
            yield group[mask].tolist()

    def state_dict(self) -> dict:
        """``{"step": ...}``: where the cycle is (the generator's state is the caller's)."""
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the cycle where :meth:`state_dict` left it."""
        self.step = int(state_dict["step"])

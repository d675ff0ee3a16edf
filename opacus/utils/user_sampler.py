"""Poisson sampling of *users*: each user joins a batch with probability q, with all examples.

The batch sampler for user-level DP (``opacus.optimizers.user_level``): the privacy unit is the
user, so the amplification by subsampling of the accountant holds for users sampled
independently with rate ``q`` (the examples of a sampled user all come along; those of the
others stay out).

When to use it: when one person can contribute many examples (messages of one author, sessions
of one customer) and the promise you make is about people, not rows. Example-level DP with
``k`` examples per user only protects a user with ``k * epsilon`` (group privacy), which is weak
for large ``k``. User-level DP protects each user with ``epsilon`` but needs many users: the
noise is calibrated to one user's clipped contribution and divided by the expected number of
*users* per batch.
"""

from typing import Iterator, List, Optional, Sequence

import torch
from torch.utils.data import Sampler

from opacus.data_loader.samplers import _batches_per_epoch, _check_sample_rate

__all__ = ["UserPoissonSampler"]


class UserPoissonSampler(Sampler[List[int]]):
    """Batch sampler: every user is in a batch with probability ``sample_rate``, independently.

    Args:
        user_ids: the user of every example, ``user_ids[i]`` for example ``i`` (any integers or
            hashable values).
        sample_rate: the probability ``q`` with which each user joins each batch (the rate the
            accountant must record).
        generator: ``torch.Generator`` for the draws.
        steps: batches per epoch, ``int(1 / sample_rate)`` by default.

    Batches are lists of example indices, grouped by user (a user's examples are consecutive, in
    dataset order), possibly empty. Attributes: ``sample_rate``, ``num_users``, ``num_samples``,
    ``user_index`` (a ``(num_samples,)`` tensor of compact user indices ``0..num_users-1``),
    ``expected_batch_size`` (expected number of *users* per batch), ``steps``.
    """

    def __init__(
        self,
        *,
        user_ids: Sequence,
        sample_rate: float,
        generator: Optional[torch.Generator] = None,
        steps: Optional[int] = None,
    ):
        owner = type(self).__name__
        if torch.is_tensor(user_ids):
            user_ids = user_ids.tolist()
        user_ids = list(user_ids)
        if len(user_ids) == 0:
            raise ValueError(f"{owner}: user_ids is empty: the dataset must hold examples")
        first_seen = {}
        for u in user_ids:
            if u not in first_seen:
                first_seen[u] = len(first_seen)
        self.user_keys = list(first_seen)
        self.user_index = torch.tensor([first_seen[u] for u in user_ids], dtype=torch.long)
        self.num_samples = len(user_ids)
        self.num_users = len(first_seen)
        self.sample_rate = _check_sample_rate(owner, sample_rate)
        self.generator = generator
        self.steps = _batches_per_epoch(owner, self.sample_rate, steps)
        order = torch.argsort(self.user_index, stable=True)
        counts = torch.bincount(self.user_index, minlength=self.num_users)
        # _examples_of[u]: the indices of user u's examples (dataset order).
        self._examples_of = [t.tolist() for t in torch.split(order, counts.tolist())]

    @property
    def expected_batch_size(self) -> float:
        """Expected number of users per batch, ``sample_rate * num_users``."""
        return self.sample_rate * self.num_users

    def __len__(self) -> int:
        return self.steps

    def sample_users(self) -> List[int]:
        """One draw: the compact indices of the users in the next batch."""
        mask = torch.rand(self.num_users, generator=self.generator) < self.sample_rate
        return mask.nonzero().view(-1).tolist()

    def examples_of(self, users: Sequence[int]) -> List[int]:
        """The example indices of ``users`` (compact indices), grouped by user."""
        return [i for u in users for i in self._examples_of[u]]

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps):
            yield self.examples_of(self.sample_users())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_users={self.num_users}, num_samples={self.num_samples}, "
            f"sample_rate={self.sample_rate}, steps={self.steps})"
        )

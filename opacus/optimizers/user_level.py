"""User-level clipping: each *user's* summed contribution is clipped, not each example's.

Example-level DP-SGD bounds the influence of one example. When one person (an author, a
customer, a device) contributes many examples, the guarantee that matters is about that person:
adding or removing *all* of their examples (McMahan et al. 2018, "Learning differentially private
recurrent language models", user-level DP-FedAvg; the "author-level" privacy of Microsoft's
``dp-transformers``). The clipping axis then becomes the user:

    G_u = sum_{i in examples of u} g_i,      clipped_u = G_u * min(1, C / (||G_u|| + 1e-6)),

and the released sum ``sum_u clipped_u + N(0, (sigma C)^2)`` has sensitivity ``C`` per *user*.
With users sampled by Poisson sampling at rate ``q`` (``opacus.utils.user_sampler``), the
accountant records ``(sigma, q)`` exactly as at the example level.

The grouping is one ``index_add`` per parameter (rows of the same user summed into one row), then
the ordinary flat clipping of ``opacus.optimizers.clipping`` on the per-user rows.
"""

from typing import List, Optional, Sequence

import torch
from torch.optim import Optimizer

from opacus.optimizers import clipping
from opacus.optimizers.optimizer import DPOptimizer

__all__ = ["DPUserLevelOptimizer", "per_user_sums", "user_level_clipped_sums"]


def _compact_user_index(user_ids: torch.Tensor, batch_size: int, owner: str) -> torch.Tensor:
    """``user_ids`` (batch,) of any integer values -> compact indices 0..U-1 (same grouping)."""
    if not torch.is_tensor(user_ids):
        user_ids = torch.as_tensor(user_ids)
    if user_ids.dim() != 1 or user_ids.shape[0] != batch_size:
        raise ValueError(
            f"{owner}: user_ids must have shape ({batch_size},), one user id per row of the "
            f"per-sample gradients, got shape {tuple(user_ids.shape)}"
        )
    if user_ids.is_floating_point() or user_ids.is_complex():
        raise TypeError(f"{owner}: user_ids must be an integer tensor, got {user_ids.dtype}")
    _, inverse = torch.unique(user_ids, return_inverse=True)
    return inverse


def per_user_sums(
    grad_samples: Sequence[torch.Tensor], user_ids: torch.Tensor
) -> List[torch.Tensor]:
    """``[(num_users, *param.shape)]``: the per-sample gradients of each user's rows summed.

    Users are ordered by increasing id. ``user_ids`` has one integer id per row (dim 0).
    """
    batch = clipping.check_batch_sizes(grad_samples)
    index = _compact_user_index(user_ids, batch, "per_user_sums")
    num_users = int(index.max().item()) + 1 if index.numel() else 0
    out = []
    for g in grad_samples:
        sums = g.new_zeros((num_users, *g.shape[1:]))
        out.append(sums.index_add_(0, index.to(g.device), g))
    return out


def user_level_clipped_sums(
    grad_samples: Sequence[torch.Tensor], user_ids: torch.Tensor, max_grad_norm: float
) -> List[torch.Tensor]:
    """Sum each user's per-sample gradients, clip each user's sum to ``max_grad_norm`` (all
    parameters together, as flat clipping), and sum over users; one tensor per parameter."""
    return clipping.flat_clipped_sums(per_user_sums(grad_samples, user_ids), max_grad_norm)


class DPUserLevelOptimizer(DPOptimizer):
    """``DPOptimizer`` whose clipping unit is the user, not the example (module docstring).

    Before each ``step()`` (virtual or real) call ``set_user_ids(ids)`` with one integer user id
    per row of the per-sample gradients about to be clipped (rows of all backward passes since
    the last ``zero_grad()``, in order). A user's rows may be split across *virtual* steps only if
    each virtual step holds all of that user's rows: clipping happens at every ``step()``.

    ``expected_batch_size`` is the expected number of *users* per logical batch
    (``user sample rate * number of users``): with ``loss_reduction="mean"`` the noisy sum is
    divided by it. Account with the user sample rate (``UserPoissonSampler.sample_rate``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: Optional[int],
        loss_reduction: str = "mean",
        generator=None,
        secure_mode: bool = False,
        **kwargs,
    ):
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
            secure_mode=secure_mode,
            **kwargs,
        )
        self.user_ids: Optional[torch.Tensor] = None

    def set_user_ids(self, user_ids) -> None:
        """The user id of every per-sample gradient row that the next ``step()`` clips."""
        self.user_ids = torch.as_tensor(user_ids)

    def _clipped_sums(
        self, grad_samples: List[torch.Tensor], params: Sequence[torch.Tensor]
    ) -> List[torch.Tensor]:
        if self.user_ids is None:
            raise ValueError(
                f"{type(self).__name__}: no user ids for this step: call "
                "optimizer.set_user_ids(ids) (one id per sample of the batch) before step()"
            )
        return user_level_clipped_sums(grad_samples, self.user_ids, self.max_grad_norm)

    def clip_and_accumulate(self):
        """Clip each user's summed gradient to ``max_grad_norm`` and add the sum to summed_grad.

        The user ids are used once: the next step needs ``set_user_ids`` again.
        """
        try:
            super().clip_and_accumulate()
        finally:
            self.user_ids = None

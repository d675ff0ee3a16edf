"""``AdaClipDPOptimizer``: adaptive clipping to a target quantile of the gradient norms.

Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially private learning with adaptive
clipping", Algorithm 1.  Each step, with clip bound ``C``:

* ``b = #{i : ||g_i|| <= C}`` (unclipped samples), released as ``b~ = (b + N(0, s^2)) / n`` with
  ``s = unclipped_num_std`` and ``n`` the expected batch size;
* after the update, ``C <- C * exp(-eta * (b~ - gamma))`` (geometric update toward the quantile
  ``gamma = target_unclipped_quantile``, ``eta = clipbound_learning_rate``), clamped to
  ``[min_clipbound, max_clipbound]``.

Releasing ``b~`` costs privacy, so the gradient's noise multiplier is raised to keep the total at
``noise_multiplier`` (Theorem 1 of the paper): ``sigma_grad = (sigma^-2 - (2 s)^-2)^(-1/2)``.
``noise_multiplier`` stays the total (what the accountant must see).
"""

import math
from typing import Callable, Optional

import torch
from torch.optim import Optimizer

from opacus.optimizers import clipping
from opacus.optimizers.noise import gaussian_noise
from opacus.optimizers.optimizer import DPOptimizer


def gradient_noise_multiplier(noise_multiplier: float, unclipped_num_std: float) -> float:
    """``(sigma^-2 - (2 s)^-2)^(-1/2)``: the gradient's share of the total noise multiplier."""
    if noise_multiplier == 0:
        return 0.0
    if not 2 * unclipped_num_std > noise_multiplier:
        raise ValueError(
            f"unclipped_num_std={unclipped_num_std} is too small for noise_multiplier="
            f"{noise_multiplier}: adaptive clipping needs 2 * unclipped_num_std > "
            "noise_multiplier (the released unclipped count would use up the whole privacy "
            "budget); increase unclipped_num_std (the paper suggests about batch_size / 20)"
        )
    return (noise_multiplier ** -2 - (2 * unclipped_num_std) ** -2) ** -0.5


class AdaClipDPOptimizer(DPOptimizer):
    """``DPOptimizer`` whose ``max_grad_norm`` adapts toward a quantile of the gradient norms."""

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        target_unclipped_quantile: float,
        clipbound_learning_rate: float,
        max_clipbound: float,
        min_clipbound: float,
        unclipped_num_std: float,
        max_grad_norm: float,
        expected_batch_size: Optional[int],
        loss_reduction: str = "mean",
        generator=None,
        secure_mode: bool = False,
        **kwargs,
    ):
        if expected_batch_size is None:
            raise ValueError(
                "AdaClipDPOptimizer needs expected_batch_size (also for loss_reduction='sum'): "
                "the noisy unclipped fraction is normalised by the expected batch size, since the "
                "actual batch size is private under Poisson sampling"
            )
        if not 0 <= target_unclipped_quantile <= 1:
            raise ValueError(
                f"target_unclipped_quantile must be in [0, 1], got {target_unclipped_quantile}"
            )
        if not 0 < min_clipbound <= max_clipbound:
            raise ValueError(
                f"need 0 < min_clipbound <= max_clipbound, got {min_clipbound}, {max_clipbound}"
            )
        if unclipped_num_std < 0:
            raise ValueError(f"unclipped_num_std must be >= 0, got {unclipped_num_std}")
        gradient_noise_multiplier(noise_multiplier, unclipped_num_std)  # fail early
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
        self.target_unclipped_quantile = target_unclipped_quantile
        self.clipbound_learning_rate = clipbound_learning_rate
        self.max_clipbound = max_clipbound
        self.min_clipbound = min_clipbound
        self.unclipped_num_std = unclipped_num_std
        self.sample_size = 0
        self.unclipped_num = 0.0

    def clip_and_accumulate(self):
        """Flat clipping at the current bound, also counting the unclipped samples."""
        grad_samples = self.grad_samples
        norms = clipping.per_sample_norms(grad_samples)
        factors = clipping.clip_factors(norms, self.max_grad_norm)
        self._accumulate([clipping.weighted_sum(factors, g) for g in grad_samples])
        self.sample_size += norms.shape[0]
        self.unclipped_num += float(clipping.unclipped_count(norms, self.max_grad_norm))

    def _noise_std(self) -> float:
        sigma_grad = gradient_noise_multiplier(self.noise_multiplier, self.unclipped_num_std)
        return sigma_grad * self.max_grad_norm

    def add_noise(self):
        """Noise the gradient (``sigma_grad``) and the unclipped count (``unclipped_num_std``)."""
        super().add_noise()
        count = torch.tensor(self.unclipped_num, dtype=torch.float64)
        count_noise = gaussian_noise(
            self.unclipped_num_std,
            count,
            generator=self._count_generator(),
            secure_mode=self.secure_mode,
        )
        self.unclipped_num = float(count + count_noise)

    def _count_generator(self):
        # The count is a CPU scalar: a user generator on another device cannot draw it.
        if self.generator is not None and self.generator.device.type == "cpu":
            return self.generator
        return None

    def update_max_grad_norm(self):
        """``C <- clamp(C * exp(-eta * (b~ - gamma)), min_clipbound, max_clipbound)``."""
        n = self.expected_batch_size * self.accumulated_iterations
        unclipped_frac = self.unclipped_num / n
        self.max_grad_norm = self.max_grad_norm * math.exp(
            -self.clipbound_learning_rate * (unclipped_frac - self.target_unclipped_quantile)
        )
        self.max_grad_norm = min(self.max_clipbound, max(self.min_clipbound, self.max_grad_norm))

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """As ``DPOptimizer.pre_step``; after a real step the clip bound is updated."""
        real_step = super().pre_step(closure)
        if real_step:
            self.update_max_grad_norm()
        return real_step

    def zero_grad(self, set_to_none: bool = False):
        """As ``DPOptimizer.zero_grad``; also resets the counts unless the last step was skipped."""
        if not self._is_last_step_skipped:
            self.sample_size = 0
            self.unclipped_num = 0.0
        super().zero_grad(set_to_none)

    def _dp_state(self) -> dict:
        state = super()._dp_state()
        state.update(
            sample_size=self.sample_size,
            unclipped_num=self.unclipped_num,
            target_unclipped_quantile=self.target_unclipped_quantile,
            clipbound_learning_rate=self.clipbound_learning_rate,
            max_clipbound=self.max_clipbound,
            min_clipbound=self.min_clipbound,
            unclipped_num_std=self.unclipped_num_std,
        )
        return state

    def _load_dp_state(self, dp_state: dict) -> None:
        super()._load_dp_state(dp_state)
        for key in (
            "sample_size",
            "unclipped_num",
            "target_unclipped_quantile",
            "clipbound_learning_rate",
            "max_clipbound",
            "min_clipbound",
            "unclipped_num_std",
        ):
            setattr(self, key, dp_state[key])

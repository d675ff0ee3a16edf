"""``AdaClipDPOptimizer``: adaptive clipping to a target quantile of the gradient norms.

Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially private learning with adaptive
clipping", Algorithm 1.  Each step, with clip bound ``C``, ``b_i = 1[||g_i|| <= C]`` and ``n`` the
*expected* batch size (the actual size of a Poisson batch is private):

* the released statistic is the **centred** sum ``S = sum_i (b_i - 1/2)``, as
  ``b~ = (S + N(0, s^2)) / n + 1/2`` with ``s = unclipped_num_std``;
* after the update, ``C <- C * exp(-eta * (b~ - gamma))`` (geometric update toward the quantile
  ``gamma = target_unclipped_quantile``, ``eta = clipbound_learning_rate``), clamped to
  ``[min_clipbound, max_clipbound]``.

Privacy (Theorem 1 of the paper).  Under add/remove of one sample, ``S`` changes by
``b_new - 1/2``, i.e. by exactly ``1/2``: its sensitivity is ``1/2``, whereas the uncentred count
``sum_i b_i`` has sensitivity 1 (and would need twice the noise for the same cost).  A Gaussian
mechanism with std ``s`` on a statistic of sensitivity ``1/2`` costs as much as one with std
``2 s`` on sensitivity 1, i.e. zCDP ``rho = (1/2)^2 / (2 s^2) = 1 / (2 (2 s)^2)``.  The clipped
gradient sum (sensitivity ``C``, noise std ``sigma_grad * C``) costs ``1 / (2 sigma_grad^2)``.
zCDP adds up, so both releases together cost one Gaussian mechanism of multiplier ``sigma`` with
``sigma^-2 = sigma_grad^-2 + (2 s)^-2``; the gradient therefore uses
``sigma_grad = (sigma^-2 - (2 s)^-2)^(-1/2)`` and ``noise_multiplier`` stays the total ``sigma``
(what the accountant must see).
"""

import math
from typing import Callable, Optional

import torch
from torch.optim import Optimizer

from opacus.optimizers import clipping
from opacus.optimizers.optimizer import DPOptimizer, _generate_noise, _real_scalar


def _check_noise_split(noise_multiplier: float, unclipped_num_std: float, owner: str) -> None:
    # noise_multiplier == 0 (no privacy at all, noise-free debugging) needs no split.
    if noise_multiplier != 0 and noise_multiplier >= 2 * unclipped_num_std:
        raise ValueError(
            f"{owner}: noise_multiplier must be smaller than 2 * unclipped_num_std (got "
            f"noise_multiplier={noise_multiplier}, unclipped_num_std={unclipped_num_std}): "
            "otherwise the released unclipped count uses up the whole privacy budget; increase "
            "unclipped_num_std (the paper suggests about expected_batch_size / 20)"
        )


def gradient_noise_multiplier(noise_multiplier: float, unclipped_num_std: float) -> float:
    """``(sigma^-2 - (2 s)^-2)^(-1/2)``: the gradient's share of the total noise multiplier."""
    if noise_multiplier == 0:
        return 0.0
    _check_noise_split(noise_multiplier, unclipped_num_std, "gradient_noise_multiplier")
    return (noise_multiplier**-2 - (2 * unclipped_num_std) ** -2) ** -0.5


def centred_unclipped_sum(norms: torch.Tensor, clip_bound: float) -> float:
    """``sum_i (1[norms_i <= C] - 1/2)``: sensitivity 1/2 under add/remove (module docstring)."""
    return float(clipping.unclipped_count(norms, clip_bound)) - norms.shape[0] / 2


def unclipped_fraction(noisy_centred_sum: float, expected_batch_size: float) -> float:
    """``S~ / n + 1/2``: the released unclipped fraction from the noisy centred sum ``S~``.

    ``n`` is the *expected* batch size: dividing by the actual (private) one would leak it.
    """
    return noisy_centred_sum / expected_batch_size + 0.5


def updated_clip_bound(
    clip_bound: float,
    unclipped_frac: float,
    *,
    target_unclipped_quantile: float,
    clipbound_learning_rate: float,
    min_clipbound: float,
    max_clipbound: float,
) -> float:
    """``clamp(C * exp(-eta * (b~ - gamma)), min, max)`` (Andrew et al. 2021, geometric update).

    The one clip-bound update of both adaptive clippings (this optimizer and ghost clipping's
    ``opacus.utils.adaptive_clipping``).
    """
    new_bound = clip_bound * math.exp(
        -clipbound_learning_rate * (unclipped_frac - target_unclipped_quantile)
    )
    return min(max_clipbound, max(min_clipbound, new_bound))


def cpu_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """``generator`` if it can draw the unclipped count's noise (a CPU scalar), else None.

    A user generator on another device cannot draw it; the default generator then does.
    """
    if generator is not None and generator.device.type == "cpu":
        return generator
    return None


class AdaClipDPOptimizer(DPOptimizer):
    """``DPOptimizer`` whose ``max_grad_norm`` adapts toward a quantile of the gradient norms.

    Args:
        optimizer: the optimizer to wrap; its ``step`` runs on the private (clipped and noised)
            gradients.
        noise_multiplier: sigma: the noise standard deviation divided by ``max_grad_norm``.
        max_grad_norm: the initial clipping norm.
        expected_batch_size: the expected number of examples per logical batch (``sample_rate *
            len(dataset)``); the noised sum is divided by it when ``loss_reduction="mean"``. May be
            None only with ``loss_reduction="sum"``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the examples of a batch.
        generator: a ``torch.Generator`` for the noise (reproducible runs); None uses torch's
            default.
        secure_mode: draw the noise from a cryptographically secure source (no ``generator`` then).
        target_unclipped_quantile: the fraction of per-sample gradients that should stay below the
            clipping norm (in [0, 1]); the norm moves toward that quantile.
        clipbound_learning_rate: the step size of the geometric update of the clipping norm.
        max_clipbound: the largest clipping norm allowed.
        min_clipbound: the smallest clipping norm allowed (> 0).
        unclipped_num_std: the noise standard deviation of the private count of unclipped gradients;
            ``noise_multiplier`` must be below ``2 * unclipped_num_std``.

    Raises:
        ValueError: the clip bounds, ``unclipped_num_std``, ``target_unclipped_quantile`` or the
            noise split are invalid, or ``expected_batch_size`` is None.
    """

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
        # Order as in Opacus 1.6: the base optimizer's checks, the clip-bound range, then the
        # split of the noise between the gradient and the unclipped count.
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
        owner = type(self).__name__
        if max_clipbound <= min_clipbound:
            raise ValueError(
                f"{owner}: max_clipbound must be larger than min_clipbound, got "
                f"max_clipbound={max_clipbound}, min_clipbound={min_clipbound}"
            )
        if not min_clipbound > 0:
            raise ValueError(f"{owner}: min_clipbound must be > 0, got {min_clipbound}")
        unclipped_num_std = _real_scalar(unclipped_num_std, "unclipped_num_std", owner)
        if unclipped_num_std < 0:
            raise ValueError(f"{owner}: unclipped_num_std must be >= 0, got {unclipped_num_std}")
        _check_noise_split(self.noise_multiplier, unclipped_num_std, owner)
        if expected_batch_size is None:
            raise ValueError(
                f"{owner} needs expected_batch_size (also for loss_reduction='sum'): the noisy "
                "unclipped fraction is normalised by the expected batch size, since the actual "
                "batch size is private under Poisson sampling"
            )
        if not 0 <= target_unclipped_quantile <= 1:
            raise ValueError(
                f"{owner}: target_unclipped_quantile must be in [0, 1], got "
                f"{target_unclipped_quantile}"
            )
        self.target_unclipped_quantile = target_unclipped_quantile
        self.clipbound_learning_rate = clipbound_learning_rate
        self.max_clipbound = max_clipbound
        self.min_clipbound = min_clipbound
        self.unclipped_num_std = unclipped_num_std
        self.sample_size = 0
        self.unclipped_num = 0.0
        # The released (noisy) unclipped fraction of the last real step (module docstring).
        self.unclipped_frac: Optional[float] = None

    def _clipped_sums(self, grad_samples, params):
        """Flat clipping at the current bound, also counting the unclipped samples."""
        norms = clipping.per_sample_norms(grad_samples)
        factors = clipping.clip_factors(norms, self.max_grad_norm)
        sums = [clipping.weighted_sum(factors, g) for g in grad_samples]
        self.sample_size += norms.shape[0]
        self.unclipped_num += float(clipping.unclipped_count(norms, self.max_grad_norm))
        return sums

    def _noise_std(self) -> float:
        sigma_grad = gradient_noise_multiplier(self.noise_multiplier, self.unclipped_num_std)
        return sigma_grad * self.max_grad_norm

    def add_noise(self):
        """Noise the gradient (``sigma_grad``) and the centred unclipped sum (std ``s``).

        Sets ``unclipped_frac = (sum_i (b_i - 1/2) + N(0, s^2)) / n + 1/2`` (module docstring).
        """
        super().add_noise()
        centred = torch.tensor(self.unclipped_num - self.sample_size / 2, dtype=torch.float64)
        count_noise = _generate_noise(
            self.unclipped_num_std,
            centred,
            cpu_generator(self.generator),
            self.secure_mode,
        )
        n = self.expected_batch_size * self.accumulated_iterations
        self.unclipped_frac = unclipped_fraction(float(centred + count_noise), n)

    def update_max_grad_norm(self):
        """``C <- clamp(C * exp(-eta * (b~ - gamma)), min_clipbound, max_clipbound)``.

        Raises:
            ValueError: ``add_noise()`` has not computed the noisy unclipped fraction yet.
        """
        if self.unclipped_frac is None:
            raise ValueError("update_max_grad_norm() needs the noisy fraction: call add_noise()")
        self.max_grad_norm = updated_clip_bound(
            self.max_grad_norm,
            self.unclipped_frac,
            target_unclipped_quantile=self.target_unclipped_quantile,
            clipbound_learning_rate=self.clipbound_learning_rate,
            min_clipbound=self.min_clipbound,
            max_clipbound=self.max_clipbound,
        )

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """As ``DPOptimizer.pre_step``; after a real step the clip bound is updated.

        Args:
            closure: unused; accepted for the ``Optimizer.step`` interface.

        Returns:
            True if the wrapped optimizer should step, False for a virtual (skipped) step.
        """
        real_step = super().pre_step(closure)
        if real_step:
            self.update_max_grad_norm()
        return real_step

    def zero_grad(self, set_to_none: bool = False):
        """As ``DPOptimizer.zero_grad``; also resets the counts unless the last step was skipped.

        Args:
            set_to_none: set ``p.grad`` to None instead of zeroing it.
        """
        if not self.last_step_skipped:
            self.sample_size = 0
            self.unclipped_num = 0.0
        super().zero_grad(set_to_none)

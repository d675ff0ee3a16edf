"""Adaptive clipping (Andrew et al. 2021) on top of ghost clipping's double backward.

Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially private learning with adaptive
clipping", Algorithm 1, fused with the two backward passes of ghost clipping (Li et al. 2022):

1. first backward with the hooks on: per-sample gradient norms ``||g_i||``;
2. noisy unclipped fraction ``b~ = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / n + 1/2`` with
   ``b_i = 1[||g_i|| <= C]`` and ``n`` the expected batch size (the actual size of a Poisson
   batch is private); the sum is centred so that its add/remove sensitivity is 1/2 (below);
3. geometric update ``C <- clamp(C * exp(-eta * (b~ - gamma)), min_clipbound, max_clipbound)``;
4. second backward of ``sum_i min(1, C / ||g_i||) * L_i`` at the **new** ``C``.

Why the new bound for the current step: the optimizer noises the clipped sum with
``sigma_grad * optimizer.max_grad_norm`` at ``step()``, after this backward.  Clipping at the bound
the noise will be scaled by keeps the sensitivity equal to the noise scale; clipping at the old
bound while ``max_grad_norm`` already holds a smaller new one would under-noise.  Privacy is
the same as the paper's order (the new bound is post-processing of the released count).

Privacy split (Theorem 1 of the paper): the centred sum changes by ``b_new - 1/2 = +-1/2`` when
one sample is added or removed, so releasing it with std ``sigma_b`` costs zCDP
``(1/2)^2 / (2 sigma_b^2) = 1 / (2 (2 sigma_b)^2)``; the gradient (sensitivity ``C``, std
``sigma_grad * C``) costs ``1 / (2 sigma_grad^2)``; zCDP adds up, so both cost as much as one
Gaussian mechanism with ``sigma = (sigma_grad^-2 + (2 sigma_b)^-2)^(-1/2)``.  (The uncentred
count has sensitivity 1 and would cost four times as much.)  The optimizer's
``noise_multiplier`` stays that total ``sigma`` (what the accountant records and noise
schedulers change) and the gradient noise uses ``sigma_grad = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)``.
``sigma_b`` is derived from ``initial_noise_multiplier`` so that the count takes a fixed share
``COUNT_PRIVACY_SHARE`` of the budget ``sigma^-2``: ``(2 sigma_b)^-2 = share * sigma^-2``, i.e.
``sigma_b = 5 sigma`` for 1%, which costs the gradient 0.5% more noise.
"""

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample.grad_sample_module import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers.adaclipoptimizer import (
    centred_unclipped_sum,
    cpu_generator,
    gradient_noise_multiplier,
    unclipped_fraction,
    updated_clip_bound,
)
from opacus.optimizers.noise import gaussian_noise
from opacus.optimizers.optimizer import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.privacy_engine import PrivacyEngine
from opacus.utils.fast_gradient_clipping_utils import (
    DPLossFastGradientClipping,
    DPTensorFastGradientClipping,
    double_backward,
)

__all__ = [
    "COUNT_PRIVACY_SHARE",
    "DPDDP",
    "DPLossFastGradientAdaptiveClipping",
    "DPLossFastGradientClipping",
    "DPOptimizerFastGradientAdaptiveClipping",
    "DPOptimizerFastGradientClipping",
    "DPTensorFastGradientAdaptiveClipping",
    "DPTensorFastGradientClipping",
    "GradSampleHooksFastGradientClipping",
    "GradSampleModule",
    "GradSampleModuleFastGradientClipping",
    "PrivacyEngine",
    "PrivacyEngineAdaptiveClipping",
    "noisy_unclipped_fraction",
    "unclipped_num_std_for",
    "updated_clip_bound",
]

#: Share of the per-step privacy budget ``sigma^-2`` spent on the unclipped count.
COUNT_PRIVACY_SHARE = 0.01

_GhostModule = Union[GradSampleModuleFastGradientClipping, GradSampleHooksFastGradientClipping]


def unclipped_num_std_for(initial_noise_multiplier: float) -> float:
    """``sigma_b`` with ``(2 sigma_b)^-2 = COUNT_PRIVACY_SHARE * sigma^-2`` (module docstring)."""
    return initial_noise_multiplier / (2.0 * math.sqrt(COUNT_PRIVACY_SHARE))


def noisy_unclipped_fraction(
    norms: torch.Tensor,
    clip_bound: float,
    *,
    unclipped_num_std: float,
    expected_batch_size: float,
    generator: Optional[torch.Generator] = None,
    secure_mode: bool = False,
) -> float:
    """``(sum_i (1[norms_i <= C] - 1/2) + N(0, sigma_b^2)) / n + 1/2`` (Andrew et al. 2021).

    The centred sum has add/remove sensitivity 1/2, which is what the ``(2 sigma_b)`` privacy
    split assumes (``opacus.optimizers.adaclipoptimizer``); ``n`` is the expected batch size,
    never the actual (private) one.  ``generator``: a CPU generator or ``None``.
    """
    centred = torch.tensor(centred_unclipped_sum(norms, clip_bound), dtype=torch.float64)
    noise = gaussian_noise(unclipped_num_std, centred, generator=generator, secure_mode=secure_mode)
    return unclipped_fraction(float(centred + noise), expected_batch_size)


def _validate_knobs(
    target_unclipped_quantile,
    min_clipbound,
    max_clipbound,
    clipbound_learning_rate,
    initial_noise_multiplier,
) -> None:
    if not 0 <= target_unclipped_quantile <= 1:
        raise ValueError(
            f"target_unclipped_quantile must be in [0, 1], got {target_unclipped_quantile}"
        )
    if not 0 < min_clipbound <= max_clipbound:
        raise ValueError(
            "need 0 < min_clipbound <= max_clipbound, got "
            f"min_clipbound={min_clipbound}, max_clipbound={max_clipbound}"
        )
    if clipbound_learning_rate < 0:
        raise ValueError(f"clipbound_learning_rate must be >= 0, got {clipbound_learning_rate}")
    if initial_noise_multiplier < 0:
        raise ValueError(f"initial_noise_multiplier must be >= 0, got {initial_noise_multiplier}")


class DPOptimizerFastGradientAdaptiveClipping(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` whose gradient noise leaves room for the count release.

    ``noise_multiplier`` is the total ``sigma`` (accountant, schedulers); once
    ``unclipped_num_std`` is set (by ``DPTensorFastGradientAdaptiveClipping``) the gradient is
    noised with ``sigma_grad * max_grad_norm`` (module docstring).
    """

    def __init__(self, optimizer, *, unclipped_num_std: Optional[float] = None, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.unclipped_num_std = unclipped_num_std

    def _noise_std(self) -> float:
        if self.unclipped_num_std is None:
            return super()._noise_std()
        sigma_grad = gradient_noise_multiplier(self.noise_multiplier, self.unclipped_num_std)
        return sigma_grad * self.max_grad_norm


def _check_adaptive_optimizer(optimizer) -> None:
    if not isinstance(optimizer, DPOptimizerFastGradientAdaptiveClipping):
        raise TypeError(
            f"adaptive ghost clipping needs a DPOptimizerFastGradientAdaptiveClipping, got "
            f"{type(optimizer).__name__}: its gradient noise must leave room for the noisy "
            "unclipped count. Use PrivacyEngineAdaptiveClipping.make_private(...) (or build the "
            "optimizer with DPOptimizerFastGradientAdaptiveClipping)"
        )


def _set_adaptive_knobs(
    owner,
    optimizer,
    target_unclipped_quantile,
    min_clipbound,
    max_clipbound,
    clipbound_learning_rate,
    initial_noise_multiplier,
) -> None:
    """Validate the clip-bound update's knobs and the optimizer; store the knobs on ``owner``
    (the adaptive loss wrapper, or the per-batch loss tensor it hands them to)."""
    _validate_knobs(
        target_unclipped_quantile,
        min_clipbound,
        max_clipbound,
        clipbound_learning_rate,
        initial_noise_multiplier,
    )
    _check_adaptive_optimizer(optimizer)
    owner.target_unclipped_quantile = target_unclipped_quantile
    owner.min_clipbound = min_clipbound
    owner.max_clipbound = max_clipbound
    owner.clipbound_learning_rate = clipbound_learning_rate
    owner.initial_noise_multiplier = initial_noise_multiplier


class DPTensorFastGradientAdaptiveClipping(DPTensorFastGradientClipping):
    """A per-sample loss whose ``backward()`` adapts the clip bound, then clips (module docstring).

    After ``backward()``, ``p.grad`` holds the sum of per-sample gradients clipped at the new
    bound, which is also written to ``module.max_grad_norm`` and ``optimizer.max_grad_norm``.

    Args:
        module: the model wrapped for ghost clipping.
        optimizer: the adaptive ghost clipping DP optimizer.
        loss_per_sample: the loss of each sample, ``(batch,)``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the samples of the batch.
        target_unclipped_quantile: the fraction of per-sample gradients that should stay below the
            clip bound, in [0, 1].
        min_clipbound: the smallest clip bound allowed (> 0).
        max_clipbound: the largest clip bound allowed.
        clipbound_learning_rate: the step size of the geometric update of the clip bound.
        initial_noise_multiplier: the total noise multiplier that the accountant records; part of it
            goes to the private count of unclipped gradients.
    """

    def __init__(
        self,
        module: _GhostModule,
        optimizer: DPOptimizerFastGradientClipping,
        loss_per_sample: torch.Tensor,
        loss_reduction: str = "mean",
        target_unclipped_quantile: float = 0.5,
        min_clipbound: float = 1,
        max_clipbound: float = 1e8,
        clipbound_learning_rate: float = 0.2,
        initial_noise_multiplier: float = 1.0,
    ):
        super().__init__(module, optimizer, loss_per_sample, loss_reduction)
        _set_adaptive_knobs(
            self,
            optimizer,
            target_unclipped_quantile,
            min_clipbound,
            max_clipbound,
            clipbound_learning_rate,
            initial_noise_multiplier,
        )
        self.unclipped_num_std = unclipped_num_std_for(initial_noise_multiplier)

    def _check_step_is_real(self) -> None:
        optimizer = self.optimizer
        if optimizer.last_step_skipped or optimizer.next_step_skipped():
            raise NotImplementedError(
                "adaptive clipping with virtual steps (signal_skip_step / BatchMemoryManager) is "
                "not supported: each physical batch would move the clip bound while the noise "
                "is scaled by the last one. Use logical batches that fit in memory, or "
                "PrivacyEngine with grad_sample_mode='ghost' and a fixed max_grad_norm"
            )

    def backward(self):
        """Norm pass, noisy count, clip-bound update, clipped pass (module docstring).

        The passes and their safety checks are ghost clipping's own (``double_backward``); only
        the bound between them is chosen here.

        Raises:
            ValueError: the optimizer has no ``expected_batch_size`` to normalise the unclipped
                count by.
        """
        optimizer = self.optimizer
        self._check_module_reduction()
        self._check_step_is_real()
        if optimizer.expected_batch_size is None:
            raise ValueError(
                "adaptive clipping normalises the unclipped count by the optimizer's "
                "expected_batch_size, which is None: pass expected_batch_size to the optimizer"
            )
        # Fail before anything is released if the split is infeasible (e.g. a noise scheduler
        # raised sigma above 2 * sigma_b, or initial_noise_multiplier=0 with a noisy optimizer).
        gradient_noise_multiplier(optimizer.noise_multiplier, self.unclipped_num_std)
        optimizer.unclipped_num_std = self.unclipped_num_std
        double_backward(
            self.module, optimizer, self.loss_per_sample, clip_bound=self._adapted_bound
        )

    def _adapted_bound(self, norms: torch.Tensor) -> float:
        """The clip bound of this step from the first pass's per-sample norms (module docstring);
        also the optimizer's ``max_grad_norm`` from now on."""
        optimizer = self.optimizer
        unclipped_frac = noisy_unclipped_fraction(
            norms,
            optimizer.max_grad_norm,
            unclipped_num_std=self.unclipped_num_std,
            expected_batch_size=optimizer.expected_batch_size,
            generator=cpu_generator(optimizer.generator),
            secure_mode=optimizer.secure_mode,
        )
        new_bound = updated_clip_bound(
            optimizer.max_grad_norm,
            unclipped_frac,
            target_unclipped_quantile=self.target_unclipped_quantile,
            clipbound_learning_rate=self.clipbound_learning_rate,
            min_clipbound=self.min_clipbound,
            max_clipbound=self.max_clipbound,
        )
        optimizer.max_grad_norm = new_bound
        return new_bound


class DPLossFastGradientAdaptiveClipping(DPLossFastGradientClipping):
    """``DPLossFastGradientClipping`` whose losses adapt the clip bound at every ``backward()``.

    Args:
        module: the model wrapped for ghost clipping.
        optimizer: the adaptive ghost clipping DP optimizer.
        criterion: the loss function (a module with ``reduction``, or a function returning one loss
            per sample).
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the samples of the batch.
        target_unclipped_quantile: the fraction of per-sample gradients that should stay below the
            clip bound, in [0, 1].
        min_clipbound: the smallest clip bound allowed (> 0).
        max_clipbound: the largest clip bound allowed.
        clipbound_learning_rate: the step size of the geometric update of the clip bound.
        initial_noise_multiplier: the total noise multiplier that the accountant records; part of it
            goes to the private count of unclipped gradients.
    """

    def __init__(
        self,
        module: GradSampleModuleFastGradientClipping,
        optimizer: DPOptimizerFastGradientClipping,
        criterion,
        loss_reduction: str = "mean",
        target_unclipped_quantile: float = 0.5,
        min_clipbound: float = 1,
        max_clipbound: float = 1e8,
        clipbound_learning_rate: float = 0.2,
        initial_noise_multiplier: float = 1.0,
    ):
        super().__init__(module, optimizer, criterion, loss_reduction)
        _set_adaptive_knobs(
            self,
            optimizer,
            target_unclipped_quantile,
            min_clipbound,
            max_clipbound,
            clipbound_learning_rate,
            initial_noise_multiplier,
        )

    def __call__(
        self, input, target, shape: Optional[Sequence[int]] = None
    ) -> DPTensorFastGradientAdaptiveClipping:
        """Per-sample losses of ``criterion(input, target)`` as the adaptive tensor wrapper."""
        loss = self._per_sample_losses(input, target, shape)
        return DPTensorFastGradientAdaptiveClipping(
            self.module,
            self.optimizer,
            loss,
            self.loss_reduction,
            target_unclipped_quantile=self.target_unclipped_quantile,
            min_clipbound=self.min_clipbound,
            max_clipbound=self.max_clipbound,
            clipbound_learning_rate=self.clipbound_learning_rate,
            initial_noise_multiplier=self.initial_noise_multiplier,
        )


class PrivacyEngineAdaptiveClipping(PrivacyEngine):
    """``PrivacyEngine`` for ghost clipping with an adaptive clip bound (Andrew et al. 2021).

    ``make_private`` takes the usual arguments (``max_grad_norm`` is the initial bound,
    ``noise_multiplier`` the total ``sigma`` the accountant records) plus
    ``target_unclipped_quantile``, ``min_clipbound``, ``max_clipbound`` and
    ``clipbound_learning_rate``, and returns ``(module, optimizer, criterion, data_loader)`` with a
    ``DPLossFastGradientAdaptiveClipping`` criterion.

    Args:
        accountant: the privacy accountant: ``"prv"`` (default), ``"rdp"`` or ``"gdp"``.
        secure_mode: draw the noise and the batches from cryptographically seeded sources (see
            ``PrivacyEngine``).
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        super().__init__(accountant=accountant, secure_mode=secure_mode)

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion=nn.CrossEntropyLoss(),  # noqa: B008 (the public signature's default)
        noise_multiplier: float,
        loss_reduction: str = "mean",
        grad_sample_mode: str = "ghost",
        target_unclipped_quantile: float = 0.5,
        min_clipbound: float = 1,
        max_clipbound: float = 1e8,
        clipbound_learning_rate: float = 0.2,
        **kwargs,
    ):
        """``PrivacyEngine.make_private`` with ghost clipping and an adaptive clip bound."""
        if grad_sample_mode != "ghost":
            raise ValueError(
                f"PrivacyEngineAdaptiveClipping supports grad_sample_mode='ghost' only, got "
                f"{grad_sample_mode!r}; for other modes use PrivacyEngine with "
                "clipping='adaptive'"
            )
        if isinstance(module, (DPDDP, DDP)):
            raise NotImplementedError(
                "PrivacyEngineAdaptiveClipping does not support distributed training (the "
                "unclipped counts would have to be summed across ranks); use PrivacyEngine"
            )
        _validate_knobs(
            target_unclipped_quantile,
            min_clipbound,
            max_clipbound,
            clipbound_learning_rate,
            noise_multiplier,
        )
        module, optimizer, dp_criterion, data_loader = super().make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            noise_multiplier=noise_multiplier,
            loss_reduction=loss_reduction,
            grad_sample_mode=grad_sample_mode,
            **kwargs,
        )
        adaptive_criterion = DPLossFastGradientAdaptiveClipping(
            module,
            optimizer,
            dp_criterion.criterion,
            loss_reduction,
            target_unclipped_quantile=target_unclipped_quantile,
            min_clipbound=min_clipbound,
            max_clipbound=max_clipbound,
            clipbound_learning_rate=clipbound_learning_rate,
            initial_noise_multiplier=noise_multiplier,
        )
        return module, optimizer, adaptive_criterion, data_loader

    def make_private_with_epsilon(self, *, grad_sample_mode: str = "ghost", **kwargs):
        """``PrivacyEngine.make_private_with_epsilon`` defaulting to ghost clipping."""
        return super().make_private_with_epsilon(grad_sample_mode=grad_sample_mode, **kwargs)

    def _prepare_optimizer(
        self, *, optimizer, noise_generator, distributed, clipping, grad_sample_mode, **kwargs
    ) -> DPOptimizer:
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        return DPOptimizerFastGradientAdaptiveClipping(
            optimizer, generator=noise_generator, secure_mode=self.secure_mode, **kwargs
        )

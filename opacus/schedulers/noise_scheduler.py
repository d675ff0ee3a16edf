"""Noise schedulers: change ``optimizer.noise_multiplier`` once per ``step()`` (e.g. per epoch).

Modelled on ``torch.optim.lr_scheduler``: the constructor applies step 0, and each ``step()``
advances ``last_epoch`` and writes the new value.  The accountant hook reads
``optimizer.noise_multiplier`` at every optimizer step, so the privacy cost follows the schedule.
"""

from typing import Callable

from opacus.optimizers import DPOptimizer
from opacus.schedulers._base import _check_step_size, _OptimizerAttributeScheduler


class _NoiseScheduler(_OptimizerAttributeScheduler):
    """Base class: subclasses implement ``get_noise_multiplier()`` for epoch ``last_epoch``."""

    _attribute = "noise_multiplier"
    _family = "noise schedulers"

    def get_noise_multiplier(self):
        """The noise multiplier for the current ``last_epoch``."""
        raise NotImplementedError

    def _get_value(self):
        return self.get_noise_multiplier()


class ExponentialNoise(_NoiseScheduler):
    """``noise_multiplier *= gamma`` every step: ``sigma_k = sigma_0 * gamma^k``.

    Args:
        optimizer: the DP optimizer whose attribute is scheduled.
        last_epoch: the index of the last step taken (-1: none yet).
        gamma: the factor applied to ``noise_multiplier`` at every step.
    """

    def __init__(self, optimizer: DPOptimizer, *, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self):
        """Noise multiplier for ``last_epoch``: the optimizer's current one times ``gamma``.

        Epoch 0 keeps the initial value; ``step()`` writes the result back, so epoch ``k`` gets
        ``sigma_0 * gamma^k``.
        """
        return self._exponential_value()


class LambdaNoise(_NoiseScheduler):
    """``sigma_k = sigma_0 * noise_lambda(k)``; ``sigma_0`` is the value at construction.

    Args:
        optimizer: the DP optimizer whose attribute is scheduled.
        last_epoch: the index of the last step taken (-1: none yet).
        noise_lambda: ``k -> factor``: ``noise_multiplier`` at step k is the initial value times it.
    """

    def __init__(
        self,
        optimizer: DPOptimizer,
        *,
        noise_lambda: Callable[[int], float],
        last_epoch: int = -1,
    ):
        self.noise_lambda = noise_lambda
        self.base_noise_multiplier = optimizer.noise_multiplier
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self):
        """Noise multiplier for ``last_epoch``: ``base_noise_multiplier * noise_lambda(k)``.

        ``k`` is ``last_epoch``; ``base_noise_multiplier`` is the optimizer's value at construction.
        """
        return self.base_noise_multiplier * self.noise_lambda(self.last_epoch)


class StepNoise(_NoiseScheduler):
    """``noise_multiplier *= gamma`` every step_size steps: ``sigma_0 gamma^(k // step_size)``.

    Args:
        optimizer: the DP optimizer whose attribute is scheduled.
        last_epoch: the index of the last step taken (-1: none yet).
        step_size: the number of steps between two decays.
        gamma: the decay factor.
    """

    def __init__(
        self, optimizer: DPOptimizer, *, step_size: int, gamma: float, last_epoch: int = -1
    ):
        _check_step_size(step_size)
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self):
        """Noise multiplier for ``last_epoch``: the current one times ``gamma`` when ``last_epoch``
        is a positive multiple of ``step_size``, else unchanged (``sigma_0 gamma^(k // step_size)``
        at epoch ``k``).
        """
        return self._stepped_value()

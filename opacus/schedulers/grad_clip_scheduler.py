"""Clip-bound schedulers: change ``optimizer.max_grad_norm`` once per ``step()`` (e.g. per epoch).

Modelled on ``torch.optim.lr_scheduler``: the constructor applies step 0, and each ``step()``
advances ``last_epoch`` and writes the new value.  Only the optimizer attribute is changed:
the optimizer clips (and sizes the noise) with it, and with ghost clipping
``DPLossFastGradientClipping`` copies it into the module before each backward.  For per-layer
clipping, setting the total bound rescales every per-layer bound by the same factor.
"""

from typing import Callable

from opacus.optimizers import DPOptimizer
from opacus.schedulers._base import _check_step_size, _OptimizerAttributeScheduler


class _GradClipScheduler(_OptimizerAttributeScheduler):
    """Base class: subclasses implement ``get_max_grad_norm()`` for epoch ``last_epoch``."""

    _attribute = "max_grad_norm"
    _family = "clip-bound schedulers"

    def get_max_grad_norm(self):
        """The clip bound for the current ``last_epoch``."""
        raise NotImplementedError

    def _get_value(self):
        return self.get_max_grad_norm()


class ExponentialGradClip(_GradClipScheduler):
    """``max_grad_norm *= gamma`` every step: ``C_k = C_0 * gamma^k``.

    Args:
        optimizer: the DP optimizer whose attribute is scheduled.
        last_epoch: the index of the last step taken (-1: none yet).
        gamma: the factor applied to ``max_grad_norm`` at every step.
    """

    def __init__(self, optimizer: DPOptimizer, *, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self):
        """Clip bound for ``last_epoch``: the optimizer's current one times ``gamma``.

        Epoch 0 keeps the initial value; ``step()`` writes the result back, so epoch ``k`` gets
        ``C_0 * gamma^k``.
        """
        return self._exponential_value()


class LambdaGradClip(_GradClipScheduler):
    """``C_k = C_0 * scheduler_function(k)``; ``C_0`` is the value at construction.

    Args:
        optimizer: the DP optimizer whose attribute is scheduled.
        last_epoch: the index of the last step taken (-1: none yet).
        scheduler_function: ``k -> factor``: ``max_grad_norm`` at step k is the initial value times
            it.
    """

    def __init__(
        self,
        optimizer: DPOptimizer,
        *,
        scheduler_function: Callable[[int], float],
        last_epoch: int = -1,
    ):
        self.scheduler_function = scheduler_function
        self.base_max_grad_norm = optimizer.max_grad_norm
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self):
        """Clip bound for ``last_epoch``: ``base_max_grad_norm * scheduler_function(k)``.

        ``k`` is ``last_epoch``; ``base_max_grad_norm`` is the optimizer's value at construction.
        """
        return self.base_max_grad_norm * self.scheduler_function(self.last_epoch)


class StepGradClip(_GradClipScheduler):
    """``max_grad_norm *= gamma`` every ``step_size`` steps: ``C_0 * gamma^(k // step_size)``.

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

    def get_max_grad_norm(self):
        """Clip bound for ``last_epoch``: the current one times ``gamma`` when ``last_epoch`` is a
        positive multiple of ``step_size``, else unchanged (so ``C_0 * gamma^(k // step_size)``).
        """
        return self._stepped_value()

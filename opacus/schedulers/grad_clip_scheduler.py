"""Clip-bound schedulers: change ``optimizer.max_grad_norm`` once per ``step()`` (e.g. per epoch).

Modelled on ``torch.optim.lr_scheduler``: the constructor applies step 0, and each ``step()``
advances ``last_epoch`` and writes the new value.  Only the optimizer attribute is changed:
the optimizer clips (and sizes the noise) with it, and with ghost clipping
``DPLossFastGradientClipping`` copies it into the module before each backward.  For per-layer
clipping, setting the total bound rescales every per-layer bound by the same factor.
"""

from typing import Callable

from opacus.optimizers import DPOptimizer


class _GradClipScheduler(object):
    """Base class: subclasses implement ``get_max_grad_norm()`` for epoch ``last_epoch``."""

    def __init__(self, optimizer: DPOptimizer, *, last_epoch=-1):
        if not hasattr(optimizer, "max_grad_norm"):
            raise TypeError(
                f"clip-bound schedulers drive a DPOptimizer (with max_grad_norm), got "
                f"{type(optimizer).__name__}; pass the optimizer returned by make_private"
            )
        self.optimizer = optimizer
        self.last_epoch = last_epoch
        self.step()

    def state_dict(self):
        """Every attribute except the optimizer and callables (which cannot be pickled)."""
        return {
            key: value
            for key, value in self.__dict__.items()
            if key != "optimizer" and not callable(value)
        }

    def load_state_dict(self, state_dict):
        """Restore the attributes saved by ``state_dict``."""
        self.__dict__.update(state_dict)

    def get_max_grad_norm(self):
        """The clip bound for the current ``last_epoch``."""
        raise NotImplementedError

    def step(self):
        """Advance one epoch and write the new clip bound into the optimizer."""
        self.last_epoch += 1
        self.optimizer.max_grad_norm = self.get_max_grad_norm()


class ExponentialGradClip(_GradClipScheduler):
    """``max_grad_norm *= gamma`` every step: ``C_k = C_0 * gamma^k``."""

    def __init__(self, optimizer: DPOptimizer, *, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self):
        if self.last_epoch == 0:
            return self.optimizer.max_grad_norm
        return self.optimizer.max_grad_norm * self.gamma


class LambdaGradClip(_GradClipScheduler):
    """``C_k = C_0 * scheduler_function(k)``; ``C_0`` is the value at construction."""

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
        return self.base_max_grad_norm * self.scheduler_function(self.last_epoch)


class StepGradClip(_GradClipScheduler):
    """``max_grad_norm *= gamma`` every ``step_size`` steps: ``C_0 * gamma^(k // step_size)``."""

    def __init__(
        self, optimizer: DPOptimizer, *, step_size: int, gamma: float, last_epoch: int = -1
    ):
        if step_size <= 0:
            raise ValueError(f"step_size must be a positive integer, got {step_size}")
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self.optimizer.max_grad_norm
        return self.gamma * self.optimizer.max_grad_norm

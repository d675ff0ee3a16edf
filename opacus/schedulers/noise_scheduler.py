"""Noise schedulers: change ``optimizer.noise_multiplier`` once per ``step()`` (e.g. per epoch).

Modelled on ``torch.optim.lr_scheduler``: the constructor applies step 0, and each ``step()``
advances ``last_epoch`` and writes the new value.  The accountant hook reads
``optimizer.noise_multiplier`` at every optimizer step, so the privacy cost follows the schedule.
"""

from typing import Callable

from opacus.optimizers import DPOptimizer


class _NoiseScheduler(object):
    """Base class: subclasses implement ``get_noise_multiplier()`` for epoch ``last_epoch``."""

    def __init__(self, optimizer: DPOptimizer, *, last_epoch=-1):
        if not hasattr(optimizer, "noise_multiplier"):
            raise TypeError(
                f"noise schedulers drive a DPOptimizer (with noise_multiplier), got "
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

    def get_noise_multiplier(self):
        """The noise multiplier for the current ``last_epoch``."""
        raise NotImplementedError

    def step(self):
        """Advance one epoch and write the new noise multiplier into the optimizer."""
        self.last_epoch += 1
        self.optimizer.noise_multiplier = self.get_noise_multiplier()


class ExponentialNoise(_NoiseScheduler):
    """``noise_multiplier *= gamma`` every step: ``sigma_k = sigma_0 * gamma^k``."""

    def __init__(self, optimizer: DPOptimizer, *, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self):
        if self.last_epoch == 0:
            return self.optimizer.noise_multiplier
        return self.optimizer.noise_multiplier * self.gamma


class LambdaNoise(_NoiseScheduler):
    """``sigma_k = sigma_0 * noise_lambda(k)``; ``sigma_0`` is the value at construction."""

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
        return self.base_noise_multiplier * self.noise_lambda(self.last_epoch)


class StepNoise(_NoiseScheduler):
    """``noise_multiplier *= gamma`` every step_size steps: ``sigma_0 gamma^(k // step_size)``."""

    def __init__(
        self, optimizer: DPOptimizer, *, step_size: int, gamma: float, last_epoch: int = -1
    ):
        if step_size <= 0:
            raise ValueError(f"step_size must be a positive integer, got {step_size}")
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self.optimizer.noise_multiplier
        return self.gamma * self.optimizer.noise_multiplier

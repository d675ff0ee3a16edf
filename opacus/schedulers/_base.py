"""Shared machinery of the noise and clip-bound schedulers (``torch.optim.lr_scheduler`` style).

A scheduler drives one numeric attribute of a DP optimizer: the constructor applies step 0, and
each ``step()`` advances ``last_epoch`` and writes the new value into the optimizer.  Subclasses
name the attribute (``_attribute``) and compute the value for ``last_epoch`` (``_get_value``).
"""


class _OptimizerAttributeScheduler(object):
    """Base of ``_NoiseScheduler`` and ``_GradClipScheduler``."""

    #: the optimizer attribute this scheduler writes at every ``step()``
    _attribute: str = ""
    #: how the scheduler family is named in error messages
    _family: str = ""

    def __init__(self, optimizer, *, last_epoch=-1):
        if not hasattr(optimizer, self._attribute):
            raise TypeError(
                f"{self._family} drive a DPOptimizer (with {self._attribute}), got "
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

    def _get_value(self):
        raise NotImplementedError

    def step(self):
        """Advance one epoch and write the new value into the optimizer."""
        self.last_epoch += 1
        setattr(self.optimizer, self._attribute, self._get_value())

    def _current_value(self):
        return getattr(self.optimizer, self._attribute)

    def _exponential_value(self):
        # v_k = v_0 * gamma^k, applied incrementally (step 0 keeps the initial value).
        if self.last_epoch == 0:
            return self._current_value()
        return self._current_value() * self.gamma

    def _stepped_value(self):
        # v_k = v_0 * gamma^(k // step_size), applied incrementally every step_size steps.
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current_value()
        return self.gamma * self._current_value()


def _check_step_size(step_size):
    if step_size <= 0:
        raise ValueError(f"step_size must be a positive integer, got {step_size}")

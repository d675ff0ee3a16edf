"""Base classes shared by every way of obtaining per-sample information.

``AbstractGradSampleHooks`` holds the state that does not depend on *how* per-sample gradients
are computed (the wrapped module, the layout of the batch, the loss reduction, whether several
backward passes may accumulate) and the clean-up of the per-parameter attributes the machinery
writes (``grad_sample``, ``_forward_counter``, ``_current_grad_sample``, ``_norm_sample``).
``AbstractGradSampleModule`` turns it into an ``nn.Module`` wrapper whose attribute access falls
through to the wrapped module.
"""

import logging
from abc import ABC
from typing import List

import torch
import torch.nn as nn

from opacus.grad_sample.module_utils import trainable_parameters

__all__ = ["AbstractGradSampleHooks", "AbstractGradSampleModule", "trainable_parameters"]

logger = logging.getLogger(__name__)

# Per-sample attributes ``del_grad_sample`` removes from a parameter; ``cleanup`` also removes the
# hooks' call counter.
_PER_PARAM_ATTRIBUTES = ("grad_sample", "_current_grad_sample", "_norm_sample")
_HOOK_PARAM_ATTRIBUTES = ("_forward_counter",)

_LOSS_REDUCTIONS = ("mean", "sum")


def _check_loss_reduction(loss_reduction: str) -> str:
    if loss_reduction not in _LOSS_REDUCTIONS:
        raise ValueError(
            f"loss_reduction={loss_reduction!r} is not supported: use 'mean' (the loss is the "
            "mean of the per-sample losses) or 'sum'"
        )
    return loss_reduction


class AbstractGradSampleHooks(ABC):
    """State and clean-up common to every per-sample gradient engine.

    Args:
        m: the model whose trainable parameters get per-sample information.
        batch_first: True if the batch is on dim 0 of the layers' inputs, False if on dim 1
            (``(T, B, ...)`` sequence layout).
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the per-sample losses.
    """

    def __init__(self, m: nn.Module, *, batch_first=True, loss_reduction="mean"):
        self._module = m
        self.batch_first = batch_first
        self.loss_reduction = _check_loss_reduction(loss_reduction)
        self._grad_accumulation_allowed = True

    def _trainable_params(self) -> List[nn.Parameter]:
        return [p for _, p in trainable_parameters(self._module)]

    @property
    def grad_accumulation_allowed(self) -> bool:
        """False after ``forbid_grad_accumulation`` (Poisson sampling), True otherwise."""
        return self._grad_accumulation_allowed

    def allow_grad_accumulation(self):
        """Let several backward passes accumulate (the default): each pass adds its own chunk,
        so ``p.grad_sample`` becomes a list with one tensor per pass."""
        self._grad_accumulation_allowed = True

    def forbid_grad_accumulation(self):
        """Make a backward pass raise ``ValueError`` when ``grad_sample`` already holds a pass.

        Under Poisson sampling every batch is one step of the privacy analysis, so a second pass
        before ``optimizer.step()``/``zero_grad()`` is refused (``make_private`` sets this).
        """
        self._grad_accumulation_allowed = False

    def set_grad_sample_to_none(self):
        """Set ``p.grad_sample`` to None for every trainable parameter (and every parameter that
        has one); frozen parameters get no attribute."""
        for p in self._module.parameters():
            if p.requires_grad or hasattr(p, "grad_sample"):
                p.grad_sample = None

    def del_grad_sample(self):
        """Delete the per-sample attributes from every parameter of the wrapped model."""
        for p in self._module.parameters():
            for attr in _PER_PARAM_ATTRIBUTES:
                if hasattr(p, attr):
                    delattr(p, attr)

    def remove_hooks(self) -> None:
        """Detach everything this object installed on the model (engines override this)."""

    def cleanup(self):
        """Remove the hooks (a failure is logged as a warning), then every per-parameter
        attribute the machinery wrote: the model is left as it was given."""
        try:
            self.remove_hooks()
        except Exception as err:  # noqa: BLE001  (clean the parameters whatever happened)
            logger.warning("%s.cleanup: removing the hooks failed: %r", type(self).__name__, err)
        self.del_grad_sample()
        for p in self._module.parameters():
            for attr in _HOOK_PARAM_ATTRIBUTES:
                if hasattr(p, attr):
                    delattr(p, attr)

    def _close(self):
        self.cleanup()


class AbstractGradSampleModule(nn.Module, AbstractGradSampleHooks, ABC):
    """An ``nn.Module`` wrapper around a model whose parameters receive per-sample information.

    The wrapped model is ``self._module``; attributes not found on the wrapper are looked up on it.

    Args:
        m: the model to wrap.
        batch_first: True if the batch is dimension 0 of every layer's input and output, False for
            dimension 1.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch; per-sample
            gradients are rescaled for ``"mean"``.
    """

    def __init__(self, m: nn.Module, *, batch_first=True, loss_reduction="mean"):
        nn.Module.__init__(self)
        AbstractGradSampleHooks.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction
        )

    def forward(self, *args, **kwargs):
        """Run the wrapped module on the same arguments; the hooks record what DP-SGD needs."""
        return self._module(*args, **kwargs)

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError as err:
            # ``_module`` itself lives in ``_modules``; guard against recursion before it is set.
            submodules = self.__dict__.get("_modules", {})
            if item != "_module" and "_module" in submodules:
                return getattr(submodules["_module"], item)
            raise err

    def __setattr__(self, name, value):
        # The hooks rewrite plain attributes of this wrapper (their per-pass state) many times
        # per step; nn.Module.__setattr__ checks each value against its parameter, submodule
        # and buffer registries.  A name already held in the instance dict is in none of them
        # (nn.Module takes a name out of the dict when it registers it), so for a value that is
        # neither a tensor (a Parameter or Buffer would register) nor a Module the plain
        # assignment is what nn.Module would do.
        if name in self.__dict__ and not isinstance(value, (torch.Tensor, nn.Module)):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def zero_grad(self, set_to_none: bool = False):
        """Clear ``p.grad`` (zeroed, or None if ``set_to_none``) and always ``p.grad_sample``.

        A per-sample gradient cannot be "zeroed" in place: the next batch may have another size.

        Args:
            set_to_none: set ``p.grad`` to None instead of zeroing it.
        """
        self.set_grad_sample_to_none()
        super().zero_grad(set_to_none)

    def to_standard_module(self) -> nn.Module:
        """Remove hooks and per-sample attributes and return the wrapped, untouched model.

        Returns:
            the wrapped model.
        """
        self.cleanup()
        return self._module

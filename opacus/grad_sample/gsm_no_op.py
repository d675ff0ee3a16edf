"""A wrapper that computes no per-sample information (``grad_sample_mode="no_op"``).

For pipelines that fill ``p.grad_sample`` themselves (e.g. with ``torch.func``): the wrapper only
provides the ``GradSampleModule`` interface the optimizer and privacy engine expect.
"""

import torch
import torch.nn as nn

from opacus.grad_sample.gsm_base import AbstractGradSampleHooks, AbstractGradSampleModule

__all__ = [
    "AbstractGradSampleHooks",
    "AbstractGradSampleModule",
    "GradSampleHooksNoOp",
    "GradSampleModuleNoOp",
]


class GradSampleHooksNoOp(AbstractGradSampleHooks):
    """Installs nothing; ``p.grad_sample`` is left to the caller.

    Args:
        m: the model.
        batch_first: recorded only.
        loss_reduction: recorded only.
    """

    def __init__(self, m: nn.Module, *, batch_first=True, loss_reduction="mean"):
        AbstractGradSampleHooks.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction
        )

    def remove_hooks(self) -> None:
        """Nothing was installed, so nothing is removed."""


class GradSampleModuleNoOp(GradSampleHooksNoOp, AbstractGradSampleModule):
    """``nn.Module`` wrapper that forwards to ``m`` and computes no per-sample gradients.

    Args:
        m: the model to wrap.
        batch_first: recorded only.
        loss_reduction: recorded only.
    """

    def __init__(self, m: nn.Module, *, batch_first=True, loss_reduction="mean"):
        AbstractGradSampleModule.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction
        )

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """Run the wrapped module unchanged (no hooks: per-sample gradients come from elsewhere).

        Args:
            x: the input, passed to the wrapped model.
        """
        return self._module(x, *args, **kwargs)

"""Fast gradient clipping for models meant for tensor parallelism.

With tensor parallelism (``torch.distributed.tensor.parallel``) a parameter sharded across ranks
contributes to a sample's squared gradient norm on every rank, so those squared norms would have to
be summed over the mesh.  This implementation supports the unsharded model only (it then behaves as
``GradSampleModuleFastGradientClipping``) and refuses ``DTensor`` parameters with
``NotImplementedError``.
"""

from typing import List

import torch
import torch.nn as nn

from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
)
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
    reject_sharded_parameters,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleModule

__all__ = [
    "AbstractGradSampleModule",
    "GradSampleHooksFastGradientClipping",
    "GradSampleHooksFastGradientClippingTP",
    "GradSampleModuleFastGradientClippingTP",
]


class GradSampleHooksFastGradientClippingTP(GradSampleHooksFastGradientClipping):
    """Ghost-clipping hooks for the tensor-parallel code path (unsharded parameters only).

    Args:
        m: the model to wrap.
        batch_first: True if the batch is dimension 0 of every layer's input and output, False for
            dimension 1.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch (per-sample
            gradients are rescaled for ``"mean"``).
        strict: raise if a layer's per-sample gradients cannot be computed (False: such layers are
            left without hooks).
        force_functorch: compute every per-sample gradient with ``torch.func`` instead of the
            layer's grad sampler.
        max_grad_norm: the clipping bound ``C`` used by ``get_clipping_coef``.
        use_ghost_clipping: use the registered norm samplers (ghost norms); False takes every norm
            from materialised per-sample gradients.
    """

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first=True,
        loss_reduction="mean",
        strict: bool = True,
        force_functorch=False,
        max_grad_norm=1,
        use_ghost_clipping=True,
    ):
        reject_sharded_parameters(m, type(self).__name__)
        GradSampleHooksFastGradientClipping.__init__(
            self,
            m,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            strict=strict,
            force_functorch=force_functorch,
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=use_ghost_clipping,
        )
        self.set_pattern_param_sample_norm_sum()

    def set_pattern_param_sample_norm_sum(self):
        """Record the parameters whose squared norms must be summed across ranks.

        Those are the sharded (``DTensor``) ones; the constructor refuses them, so the list is
        empty and ``get_norm_sample`` needs no cross-rank reduction.
        """
        reject_sharded_parameters(self._module, type(self).__name__)
        self._mesh_summed_params: List[str] = []

    def get_norm_sample(self) -> torch.Tensor:
        """Per-sample total gradient norm, shape ``(batch,)`` (no sharded parameters to reduce).

        Returns:
            the per-sample gradient norms, shape ``(batch,)``.
        """
        return super().get_norm_sample()


class GradSampleModuleFastGradientClippingTP(
    GradSampleHooksFastGradientClippingTP, AbstractGradSampleModule
):
    """``nn.Module`` wrapper for ``GradSampleHooksFastGradientClippingTP``.

    Args:
        m: the model to wrap.
        batch_first: True if the batch is dimension 0 of every layer's input and output, False for
            dimension 1.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch (per-sample
            gradients are rescaled for ``"mean"``).
        strict: raise if a layer's per-sample gradients cannot be computed (False: such layers are
            left without hooks).
        force_functorch: compute every per-sample gradient with ``torch.func`` instead of the
            layer's grad sampler.
        max_grad_norm: the clipping bound ``C`` used by ``get_clipping_coef``.
    """

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first=True,
        loss_reduction="mean",
        strict: bool = True,
        force_functorch=False,
        max_grad_norm=1,
    ):
        AbstractGradSampleModule.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction
        )
        GradSampleHooksFastGradientClippingTP.__init__(
            self,
            m,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            strict=strict,
            force_functorch=force_functorch,
            max_grad_norm=max_grad_norm,
        )

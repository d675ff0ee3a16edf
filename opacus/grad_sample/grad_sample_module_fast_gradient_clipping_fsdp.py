"""Fast gradient clipping for models meant for FSDP (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 the parameters are ``DTensor`` shards that are swapped for gathered tensors around each
layer's forward and backward, so per-parameter attributes written by the hooks would land on
temporary tensors.  This implementation supports the unsharded model (single process, or before
``fully_shard``): it then behaves exactly as ``GradSampleModuleFastGradientClipping``.  A model
whose parameters are already ``DTensor``s is refused with ``NotImplementedError`` rather than
clipped wrongly.
"""

from typing import List

import torch
import torch.nn as nn

from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.utils.module_utils import requires_grad, trainable_parameters

__all__ = [
    "AbstractGradSampleModule",
    "GradSampleHooksFastGradientClipping",
    "GradSampleHooksFastGradientClippingFSDP",
    "GradSampleModuleFastGradientClippingFSDP",
    "ft_compute_per_sample_gradient",
    "requires_grad",
    "trainable_parameters",
]


def _dtensor_parameter_names(module: nn.Module) -> List[str]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support: nothing can be sharded
        return []
    return [n for n, p in module.named_parameters() if isinstance(p, DTensor)]


def reject_sharded_parameters(module: nn.Module, wrapper: str) -> None:
    """Raise ``NotImplementedError`` if ``module`` holds ``DTensor`` (sharded) parameters."""
    names = _dtensor_parameter_names(module)
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise NotImplementedError(
            f"{wrapper}: parameters {shown} are DTensor shards; per-sample norms of sharded "
            "parameters (gathering them around the hooks and all-reducing squared norms across "
            "the device mesh) are not implemented. Wrap the unsharded model instead."
        )


class GradSampleHooksFastGradientClippingFSDP(GradSampleHooksFastGradientClipping):
    """Ghost-clipping hooks for the FSDP code path (unsharded parameters only, see module doc)."""

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction="mean",
        strict: bool = True,
        max_grad_norm=1,
    ):
        self._init_fsdp(m, batch_first, loss_reduction, strict, False, max_grad_norm, True)

    def _init_fsdp(
        self, m, batch_first, loss_reduction, strict, force_functorch, max_grad_norm, ghost
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
            use_ghost_clipping=ghost,
        )

    def capture_activations_hook(self, module: nn.Module, forward_input, _forward_output):
        """Forward hook (as the non-FSDP ghost hooks)."""
        super().capture_activations_hook(module, forward_input, _forward_output)

    def capture_backprops_hook(
        self,
        module: nn.Module,
        _forward_input: torch.Tensor,
        forward_output: torch.Tensor,
        loss_reduction: str,
        batch_first: bool,
    ):
        """Full backward hook (as the non-FSDP ghost hooks)."""
        super().capture_backprops_hook(
            module, _forward_input, forward_output, loss_reduction, batch_first
        )

    def get_norm_sample(self) -> torch.Tensor:
        """Per-sample total gradient norm, shape ``(batch,)``; the parameters are never sharded."""
        return super().get_norm_sample()


class GradSampleModuleFastGradientClippingFSDP(
    GradSampleHooksFastGradientClippingFSDP, AbstractGradSampleModule
):
    """``nn.Module`` wrapper for ``GradSampleHooksFastGradientClippingFSDP``."""

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction="mean",
        strict: bool = True,
        force_functorch=False,
        max_grad_norm=1,
        use_ghost_clipping: bool = True,
    ):
        AbstractGradSampleModule.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction
        )
        self._init_fsdp(
            m,
            batch_first,
            loss_reduction,
            strict,
            force_functorch,
            max_grad_norm,
            use_ghost_clipping,
        )

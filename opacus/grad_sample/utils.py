"""Choosing and building the per-sample gradient engine for a ``grad_sample_mode``."""

from typing import Type

import torch.nn as nn

from opacus.grad_sample.grad_sample_module import GradSampleHooks, GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
    GradSampleHooksFastGradientClippingFSDP,
    GradSampleModuleFastGradientClippingFSDP,
)
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_tp import (
    GradSampleHooksFastGradientClippingTP,
    GradSampleModuleFastGradientClippingTP,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights
from opacus.grad_sample.gsm_no_op import GradSampleHooksNoOp, GradSampleModuleNoOp
from opacus.grad_sample.registry import register_grad_sampler, register_norm_sampler

__all__ = [
    "AbstractGradSampleModule",
    "GradSampleHooks",
    "GradSampleHooksFastGradientClipping",
    "GradSampleHooksFastGradientClippingFSDP",
    "GradSampleHooksFastGradientClippingTP",
    "GradSampleHooksNoOp",
    "GradSampleModule",
    "GradSampleModuleExpandedWeights",
    "GradSampleModuleFastGradientClipping",
    "GradSampleModuleFastGradientClippingFSDP",
    "GradSampleModuleNoOp",
    "get_gsm_class",
    "get_hooks_class",
    "prepare_module",
    "register_grad_sampler",
    "register_norm_sampler",
    "wrap_model",
]

_GSM_CLASSES = {
    "hooks": GradSampleModule,
    "functorch": GradSampleModule,
    "ew": GradSampleModuleExpandedWeights,
    "ghost": GradSampleModuleFastGradientClipping,
    "ghost_fsdp": GradSampleModuleFastGradientClippingFSDP,
    "ghost_tp": GradSampleModuleFastGradientClippingTP,
    "no_op": GradSampleModuleNoOp,
}

_HOOKS_CLASSES = {
    "hooks": GradSampleHooks,
    "functorch": GradSampleHooks,
    "ghost": GradSampleHooksFastGradientClipping,
    "ghost_fsdp": GradSampleHooksFastGradientClippingFSDP,
    "ghost_tp": GradSampleHooksFastGradientClippingTP,
    "no_op": GradSampleHooksNoOp,
}


def _lookup(table, grad_sample_mode: str, what: str):
    try:
        return table[grad_sample_mode]
    except KeyError:
        raise ValueError(
            f"grad_sample_mode={grad_sample_mode!r} has no {what}; "
            f"choose one of {sorted(table)}"
        ) from None


def get_gsm_class(grad_sample_mode: str) -> Type[AbstractGradSampleModule]:
    """The ``nn.Module`` wrapper class for ``grad_sample_mode``.

    "hooks" and "functorch" share ``GradSampleModule`` ("functorch" sets ``force_functorch``);
    "ghost" is fast gradient clipping; "ew" uses PyTorch's expanded weights; "no_op" does nothing.
    """
    return _lookup(_GSM_CLASSES, grad_sample_mode, "module wrapper")


def get_hooks_class(grad_sample_mode: str):
    """The hooks-only class (model not wrapped) for ``grad_sample_mode`` ("ew" has none)."""
    return _lookup(_HOOKS_CLASSES, grad_sample_mode, "hooks-only variant (use wrap_model=True)")


def prepare_module(
    model: nn.Module, grad_sample_mode: str, wrap_model: bool = True, *args, **kwargs
):
    """Attach the ``grad_sample_mode`` engine to ``model``.

    Returns the wrapper module if ``wrap_model`` (the default), else the hooks object (the model
    keeps its identity and gets hooks directly). Extra arguments go to the class constructor.
    """
    cls = get_gsm_class(grad_sample_mode) if wrap_model else get_hooks_class(grad_sample_mode)
    if grad_sample_mode == "functorch":
        kwargs["force_functorch"] = True
    return cls(model, *args, **kwargs)


def wrap_model(model: nn.Module, grad_sample_mode: str, wrap_model: bool = True, *args, **kwargs):
    """Same as ``prepare_module``: the model wrapped (or hooked) for ``grad_sample_mode``."""
    return prepare_module(model, grad_sample_mode, wrap_model, *args, **kwargs)

"""Choosing and building the per-sample gradient engine for a ``grad_sample_mode``.

What each mode builds is the table in ``opacus.grad_sample.modes``; these are its public faces.
"""

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
from opacus.grad_sample.modes import GRAD_SAMPLE_MODES, grad_sample_mode_info
from opacus.grad_sample.registry import register_grad_sampler, register_norm_sampler

__all__ = [
    "GRAD_SAMPLE_MODES",
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
    "GradSampleModuleFastGradientClippingTP",
    "GradSampleModuleNoOp",
    "get_gsm_class",
    "get_hooks_class",
    "prepare_module",
    "register_grad_sampler",
    "register_norm_sampler",
    "wrap_model",
]


def get_gsm_class(grad_sample_mode: str) -> Type[AbstractGradSampleModule]:
    """The ``nn.Module`` wrapper class for ``grad_sample_mode`` (``opacus.grad_sample.modes``).

    "hooks" and "functorch" share ``GradSampleModule`` ("functorch" sets ``force_functorch``);
    "ghost*" are fast gradient clipping; "ew" uses PyTorch's expanded weights; "no_op" does
    nothing.

    Args:
        grad_sample_mode: a mode name: ``"hooks"``, ``"functorch"``, ``"ew"``, ``"no_op"`` or a
            ghost mode.

    Returns:
        the wrapper class.
    """
    return grad_sample_mode_info(grad_sample_mode).module_class


def get_hooks_class(grad_sample_mode: str):
    """The hooks-only class (model not wrapped) for ``grad_sample_mode`` ("ew" has none).

    Args:
        grad_sample_mode: a mode name (see ``get_gsm_class``).

    Raises:
        ValueError: the mode has no hooks-only variant (``"ew"``).
    """
    mode = grad_sample_mode_info(grad_sample_mode)
    if mode.hooks_class is None:
        raise ValueError(
            f"grad_sample_mode={grad_sample_mode!r} has no hooks-only variant: use "
            "wrap_model=True"
        )
    return mode.hooks_class


def prepare_module(
    model: nn.Module, grad_sample_mode: str, wrap_model: bool = True, *args, **kwargs
):
    """Attach the ``grad_sample_mode`` engine to ``model``.

    Returns the wrapper module if ``wrap_model`` (the default), else the hooks object (the model
    keeps its identity and gets hooks directly). Extra arguments go to the class constructor.

    Args:
        model: the model.
        grad_sample_mode: a mode name (see ``get_gsm_class``).
        wrap_model: wrap the model (True) or hook it in place (False).
    """
    mode = grad_sample_mode_info(grad_sample_mode)
    cls = mode.module_class if wrap_model else get_hooks_class(grad_sample_mode)
    if mode.force_functorch:
        kwargs["force_functorch"] = True
    return cls(model, *args, **kwargs)


def wrap_model(model: nn.Module, grad_sample_mode: str, wrap_model: bool = True, *args, **kwargs):
    """Same as ``prepare_module``: the model wrapped (or hooked) for ``grad_sample_mode``.

    Args:
        model: the model.
        grad_sample_mode: a mode name (see ``get_gsm_class``).
        wrap_model: wrap the model (True) or hook it in place (False).
    """
    return prepare_module(model, grad_sample_mode, wrap_model, *args, **kwargs)

"""Shard a model with FSDP2 (``torch.distributed.fsdp.fully_shard``) layer by layer.

Ghost clipping's hooks run per layer, so each layer that owns trainable parameters gets its own
FSDP unit: its parameters are gathered just around that layer's forward and backward.
"""

from typing import Iterable

import torch.distributed as dist
import torch.nn as nn

from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
    GradSampleModuleFastGradientClippingFSDP,
)
from opacus.grad_sample.module_utils import has_trainable_params, requires_grad

__all__ = [
    "FSDP2Wrapper",
    "GradSampleModuleFastGradientClippingFSDP",
    "has_params",
    "has_trainable_params",
    "iterate_submodules",
]


def has_params(module: nn.Module) -> bool:
    """True if ``module`` owns parameters directly (not only through its children).

    Args:
        module: the module.

    Returns:
        whether it owns parameters.
    """
    return any(True for _ in module.parameters(recurse=False))


def iterate_submodules(module: nn.Module) -> Iterable[nn.Module]:
    """Every descendant of ``module`` (not ``module`` itself), children before their parents.

    Post-order is the order ``fully_shard`` needs: a unit claims the parameters that no unit
    below it has claimed yet.

    Args:
        module: the root module.

    Returns:
        the descendants, in post-order.
    """
    for child in module.children():
        yield from iterate_submodules(child)
        yield child


def FSDP2Wrapper(model: nn.Module, **kwargs) -> nn.Module:  # noqa: N802 (public name)
    """Apply ``fully_shard(m, **kwargs)`` to every submodule owning trainable parameters, then to
    ``model``; return ``model`` (now an ``FSDPModule``).

    Needs an initialised process group (``torch.distributed.init_process_group``); ``kwargs``
    (``mesh``, ``reshard_after_forward``, ``mp_policy``, ...) go to every ``fully_shard`` call.

    Args:
        model: the model to shard.

    Returns:
        ``model``, sharded.

    Raises:
        ImportError: this torch has no ``fully_shard`` (needs 2.6 with distributed support).
        RuntimeError: no default process group is initialised.
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        raise ImportError(
            "FSDP2Wrapper needs torch.distributed.fsdp.fully_shard (torch >= 2.6 built with "
            "distributed support)"
        ) from e
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "FSDP2Wrapper: no default process group; call "
            "torch.distributed.init_process_group(backend=...) on every rank before wrapping "
            "the model"
        )
    seen = set()
    for submodule in list(iterate_submodules(model)):
        if id(submodule) in seen:  # a module registered under two names is sharded once
            continue
        seen.add(id(submodule))
        if requires_grad(submodule, recurse=False):
            fully_shard(submodule, **kwargs)
    fully_shard(model, **kwargs)
    return model

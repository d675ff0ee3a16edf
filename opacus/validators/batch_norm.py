"""BatchNorm normalises with statistics of the whole batch, so one sample's output (and
gradient) depends on the others: per-sample gradients, hence DP-SGD's clipping, lose meaning.
The fix swaps in a per-sample normalisation (GroupNorm, or InstanceNorm on request)."""

import logging
import math
from typing import List, Optional, Union

import torch
import torch.nn as nn

from opacus.validators.errors import (  # noqa: F401 (re-exported, as in the public interface)
    ShouldReplaceModuleError,
    UnsupportableModuleError,
    UnsupportedModuleError,
)
from opacus.validators.module_validator import FROZEN_MODULE_NOTICES
from opacus.validators.utils import register_module_fixer, register_module_validator

BATCHNORM = Union[nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
INSTANCENORM = Union[nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d]

_BATCH_NORMS = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
_INSTANCE_NORM_FOR = {
    nn.BatchNorm1d: nn.InstanceNorm1d,
    nn.BatchNorm2d: nn.InstanceNorm2d,
    nn.BatchNorm3d: nn.InstanceNorm3d,
}


logger = logging.getLogger(__name__)
# INFO, not NOTSET: the fixer's notice reaches handlers even under the root logger's default
# WARNING level; the logger still propagates.
logger.setLevel(logging.INFO)

# torch's own BatchNorm forwards; a subclass defining another one computes something else too.
_TORCH_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _extended_forward_class(module: nn.Module) -> Optional[type]:
    """The class whose ``forward`` replaces torch's BatchNorm forward, or ``None``.

    A subclass such as timm's ``BatchNormAct2d`` normalises and then applies an activation (or
    dropout): a bare GroupNorm in its place would silently drop that computation.
    """
    if "forward" in vars(module):  # forward patched on the instance
        return type(module)
    forward = type(module).forward
    if forward in _TORCH_BN_FORWARDS:
        return None
    for cls in type(module).__mro__:
        if vars(cls).get("forward") is forward:
            return cls
    return type(module)


def _register_hint(cls: type) -> str:
    return (
        f"Register a fixer for it (@opacus.validators.register_module_fixer({cls.__name__}) on "
        "a function returning the module to use instead, e.g. nn.Sequential(nn.GroupNorm(...), "
        "<its activation>)) or replace it in the model by hand"
    )


@register_module_validator(_BATCH_NORMS)
def validate(module: BATCHNORM) -> List[UnsupportedModuleError]:
    """A trainable BatchNorm is not DP-compatible: report it with its replacements.

    Args:
        module: the module to check.

    Returns:
        the problems found (empty if none).
    """
    extended = _extended_forward_class(module)
    if extended is not None:
        return [
            ShouldReplaceModuleError(
                "BatchNorm cannot be trained with DP-SGD: it normalises with statistics of the "
                f"whole batch, mixing samples. {extended.__qualname__} overrides forward, so "
                "ModuleValidator.fix cannot swap in a GroupNorm without changing what it "
                f"computes. {_register_hint(extended)}"
            )
        ]
    return [
        ShouldReplaceModuleError(
            "BatchNorm cannot be trained with DP-SGD: it normalises with statistics of the whole "
            "batch, mixing samples. Replace it with nn.GroupNorm, nn.LayerNorm or "
            "nn.InstanceNorm (track_running_stats=False), or call ModuleValidator.fix(model) "
            "(GroupNorm; InstanceNorm with replace_bn_with_in=True)"
        )
    ]


def _frozen_notice(module: BATCHNORM) -> Optional[str]:
    """Why a BatchNorm that ``validate`` skips (nothing in it trains) still needs attention."""
    if not (module.training or not module.track_running_stats):
        return None  # normalises with fixed running statistics: per sample
    return (
        "this BatchNorm has no trainable parameters, so ModuleValidator neither reports nor "
        "replaces it (as Opacus 1.6), but it normalises with statistics of the whole batch "
        "(mixing samples) and updates its running statistics from the private data without "
        "noise; GradSampleModule and make_private refuse it. Replace it by hand, e.g. with "
        "nn.GroupNorm(num_groups, C, affine=False)"
    )


FROZEN_MODULE_NOTICES.update({cls: _frozen_notice for cls in _BATCH_NORMS})


def _group_count(num_channels: int) -> int:
    # Wu & He (2018) use 32 groups; the count must divide the channels.
    return math.gcd(32, num_channels)


@register_module_fixer(_BATCH_NORMS)
def fix(module: BATCHNORM, **kwargs) -> Union[nn.GroupNorm, INSTANCENORM]:
    """GroupNorm(gcd(32, C), C) in place of a BatchNorm over C channels.

    Keyword arguments: ``num_groups=g`` for ``GroupNorm(g, C)`` (``g`` must divide ``C``), or
    ``replace_bn_with_in=True`` for ``InstanceNorm1d/2d/3d(C)`` (not both; ``SyncBatchNorm``
    has no InstanceNorm counterpart). Other keyword arguments are ignored. ``affine`` and
    ``eps`` are kept and the affine weight and bias (per channel in all three) copied, so a
    pretrained scale/shift survives; the running statistics have no counterpart and are
    dropped. Subclasses that override ``forward`` are refused (``UnsupportableModuleError``):
    a bare GroupNorm would drop what their forward adds (e.g. timm's ``BatchNormAct2d``).

    Args:
        module: the module to replace.

    Returns:
        a ``GroupNorm`` (or ``InstanceNorm`` with ``replace_bn_with_in=True``) with the same number
            of channels.

    Raises:
        UnsupportableModuleError: the BatchNorm subclass overrides ``forward``, or its
            dimensionality is unknown for ``replace_bn_with_in``.
        ValueError: ``num_groups`` is invalid or combined with ``replace_bn_with_in``.
    """
    logger.info(
        "The default batch_norm fixer replaces BatchNorm with GroupNorm. To replace it with "
        "InstanceNorm pass replace_bn_with_in=True; to choose the number of groups pass "
        "num_groups (default: gcd(32, num_channels))."
    )
    replace_bn_with_in = kwargs.get("replace_bn_with_in", False)
    num_groups = kwargs.get("num_groups", None)
    if replace_bn_with_in and num_groups is not None:
        raise ValueError(
            "batch_norm fix: replace_bn_with_in=True and num_groups are mutually exclusive "
            "(InstanceNorm has no groups); pass only one of them"
        )
    extended = _extended_forward_class(module)
    if extended is not None:
        raise UnsupportableModuleError(
            f"{extended.__qualname__} subclasses {_torch_base(module).__name__} but overrides "
            "forward, so the default batch_norm fixer cannot replace it: a bare GroupNorm would "
            f"drop what its forward adds to the normalisation. {_register_hint(extended)}"
        )
    channels = module.num_features
    param = module.weight if module.affine else module.running_mean
    factory = {} if param is None else {"device": param.device, "dtype": param.dtype}
    if replace_bn_with_in:
        in_type = _lookup_instance_norm(type(module))
        if in_type is None:
            raise UnsupportableModuleError(
                f"{type(module).__name__} cannot be replaced with InstanceNorm: its input "
                "dimensionality is unknown. Drop replace_bn_with_in to get GroupNorm, or "
                "replace it by hand with nn.InstanceNorm1d/2d/3d"
            )
        new = in_type(channels, eps=module.eps, affine=module.affine, **factory)
    else:
        groups = _group_count(channels) if num_groups is None else num_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise ValueError(f"batch_norm fix: num_groups must be a positive int, got {groups!r}")
        if channels % groups != 0:
            raise ValueError(
                f"batch_norm fix: num_groups={groups} does not divide the {channels} channels of "
                f"{module}; pass a divisor of {channels}"
            )
        new = nn.GroupNorm(groups, channels, eps=module.eps, affine=module.affine, **factory)
    if module.affine:
        with torch.no_grad():
            new.weight.copy_(module.weight)
            new.bias.copy_(module.bias)
        new.weight.requires_grad_(module.weight.requires_grad)
        new.bias.requires_grad_(module.bias.requires_grad)
    return new.train(module.training)


def _torch_base(module: nn.Module) -> type:
    for cls in type(module).__mro__:
        if cls in _BATCH_NORMS:
            return cls
    return nn.modules.batchnorm._BatchNorm


def _lookup_instance_norm(bn_type: type):
    for cls in bn_type.__mro__:
        if cls in _INSTANCE_NORM_FOR:
            return _INSTANCE_NORM_FOR[cls]
    return None

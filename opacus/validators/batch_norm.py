"""BatchNorm normalises with statistics of the whole batch, so one sample's output (and
gradient) depends on the others: per-sample gradients, hence DP-SGD's clipping, lose meaning.
The fix swaps in a per-sample normalisation (GroupNorm, or InstanceNorm on request)."""

import math
from typing import List, Union

import torch.nn as nn

from opacus.validators.errors import (  # noqa: F401 (re-exported, as in the public interface)
    ShouldReplaceModuleError,
    UnsupportableModuleError,
    UnsupportedModuleError,
)
from opacus.validators.utils import register_module_fixer, register_module_validator

BATCHNORM = Union[nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
INSTANCENORM = Union[nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d]

_BATCH_NORMS = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
_INSTANCE_NORM_FOR = {
    nn.BatchNorm1d: nn.InstanceNorm1d,
    nn.BatchNorm2d: nn.InstanceNorm2d,
    nn.BatchNorm3d: nn.InstanceNorm3d,
}


@register_module_validator(_BATCH_NORMS)
def validate(module: BATCHNORM) -> List[UnsupportedModuleError]:
    """BatchNorm is never DP-compatible in training: report it with its replacements."""
    return [
        ShouldReplaceModuleError(
            "BatchNorm cannot be trained with DP-SGD: it normalises with statistics of the whole "
            "batch, mixing samples. Replace it with nn.GroupNorm, nn.LayerNorm or "
            "nn.InstanceNorm (track_running_stats=False), or call ModuleValidator.fix(model) "
            "(GroupNorm; InstanceNorm with replace_bn_with_in=True)"
        )
    ]


def _group_count(num_channels: int) -> int:
    # Wu & He (2018) use 32 groups; the count must divide the channels.
    return math.gcd(32, num_channels)


@register_module_fixer(_BATCH_NORMS)
def fix(module: BATCHNORM, **kwargs) -> Union[nn.GroupNorm, INSTANCENORM]:
    """GroupNorm with gcd(32, C) groups (InstanceNorm if ``replace_bn_with_in=True``).

    The affine weight and bias (per channel in both) are copied, so a pretrained scale/shift
    survives; the running statistics have no counterpart and are dropped.
    """
    channels = module.num_features
    param = module.weight if module.affine else module.running_mean
    factory = {} if param is None else {"device": param.device, "dtype": param.dtype}
    if kwargs.get("replace_bn_with_in", False):
        in_type = _lookup_instance_norm(type(module))
        if in_type is None:  # SyncBatchNorm: dimensionality unknown; one group per channel
            new = nn.GroupNorm(channels, channels, eps=module.eps, affine=module.affine, **factory)
        else:
            new = in_type(channels, eps=module.eps, affine=module.affine, **factory)
    else:
        new = nn.GroupNorm(
            _group_count(channels), channels, eps=module.eps, affine=module.affine, **factory
        )
    if module.affine:
        new.weight.data.copy_(module.weight.data)
        new.bias.data.copy_(module.bias.data)
        new.weight.requires_grad_(module.weight.requires_grad)
        new.bias.requires_grad_(module.bias.requires_grad)
    return new.train(module.training)


def _lookup_instance_norm(bn_type: type):
    for cls in bn_type.__mro__:
        if cls in _INSTANCE_NORM_FOR:
            return _INSTANCE_NORM_FOR[cls]
    return None

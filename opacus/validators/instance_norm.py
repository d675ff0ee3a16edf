"""InstanceNorm normalises each sample on its own, which DP-SGD supports, but with
``track_running_stats=True`` its running statistics (used at evaluation) are a function of every
training sample that no clipping or noise protects."""

from typing import List, Optional, Union

import torch.nn as nn

from opacus.utils.module_utils import clone_module
from opacus.validators.errors import (  # noqa: F401 (re-exported, as in the public interface)
    IllegalModuleConfigurationError,
    UnsupportedModuleError,
)
from opacus.validators.module_validator import FROZEN_MODULE_NOTICES
from opacus.validators.utils import register_module_fixer, register_module_validator

__all__ = ["clone_module", "fix", "validate"]

INSTANCENORM = Union[nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d]
_INSTANCE_NORMS = [nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d]


@register_module_validator(_INSTANCE_NORMS)
def validate(module: INSTANCENORM) -> List[UnsupportedModuleError]:
    """Report ``track_running_stats=True``.

    Args:
        module: the module to check.

    Returns:
        the problems found (empty if none).
    """
    if not module.track_running_stats:
        return []
    return [
        IllegalModuleConfigurationError(
            "InstanceNorm with track_running_stats=True keeps running statistics of the "
            "training data outside DP-SGD's protection. Use track_running_stats=False, or call "
            "ModuleValidator.fix(model)"
        )
    ]


def _frozen_notice(module: INSTANCENORM) -> Optional[str]:
    """Why an InstanceNorm that ``validate`` skips (nothing in it trains) still matters."""
    if not (module.track_running_stats and module.training):
        return None
    return (
        "this InstanceNorm has no trainable parameters, so ModuleValidator neither reports nor "
        "fixes it (as Opacus 1.6), but with track_running_stats=True it updates running "
        "statistics from the private data without noise (used in evaluation and released with "
        "the model). Build it with track_running_stats=False"
    )


FROZEN_MODULE_NOTICES.update({cls: _frozen_notice for cls in _INSTANCE_NORMS})


@register_module_fixer(_INSTANCE_NORMS)
def fix(module: INSTANCENORM) -> INSTANCENORM:
    """A copy with ``track_running_stats=False`` (no running statistics), same affine params.

    Args:
        module: the module to replace.

    Returns:
        the replacement module.
    """
    if not module.track_running_stats:
        return module
    new = clone_module(module)
    new.track_running_stats = False
    new.running_mean = None
    new.running_var = None
    new.num_batches_tracked = None
    return new

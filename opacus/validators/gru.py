"""``nn.GRU`` runs in a fused kernel that per-sample-gradient hooks cannot see; ``DPGRU``
computes the same function from hookable layers."""

from typing import List

import torch.nn as nn

from opacus.layers.dp_rnn import DPGRU
from opacus.validators.errors import (  # noqa: F401 (re-exported, as in the public interface)
    ShouldReplaceModuleError,
    UnsupportedModuleError,
)
from opacus.validators.rnn import _common_kwargs, convert, replacement_error
from opacus.validators.utils import register_module_fixer, register_module_validator


@register_module_validator(nn.GRU)
def validate(module: nn.GRU) -> List[UnsupportedModuleError]:
    """``nn.GRU`` should be replaced by ``DPGRU``.

    Args:
        module: the module to check.

    Returns:
        the problems found (empty if none).
    """
    return replacement_error(module, "DPGRU")


@register_module_fixer(nn.GRU)
def fix(module: nn.GRU) -> DPGRU:
    """A ``DPGRU`` with the same configuration and weights.

    Args:
        module: the module to replace.

    Returns:
        a ``DPGRU`` with the same configuration and weights.
    """
    return convert(module, DPGRU(module.input_size, module.hidden_size, **_common_kwargs(module)))

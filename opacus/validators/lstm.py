"""``nn.LSTM`` runs in a fused kernel that per-sample-gradient hooks cannot see; ``DPLSTM``
computes the same function from hookable layers."""

from typing import List

import torch.nn as nn

from opacus.layers.dp_rnn import DPLSTM
from opacus.validators.errors import (  # noqa: F401 (re-exported, as in the public interface)
    ShouldReplaceModuleError,
    UnsupportedModuleError,
)
from opacus.validators.rnn import _common_kwargs, convert, replacement_error
from opacus.validators.utils import register_module_fixer, register_module_validator


@register_module_validator(nn.LSTM)
def validate(module: nn.LSTM) -> List[UnsupportedModuleError]:
    """``nn.LSTM`` should be replaced by ``DPLSTM``.

    Args:
        module: the module to check.

    Returns:
        the problems found (empty if none).
    """
    return replacement_error(module, "DPLSTM")


@register_module_fixer(nn.LSTM)
def fix(module: nn.LSTM) -> DPLSTM:
    """A ``DPLSTM`` with the same configuration (``proj_size`` included) and weights.

    Args:
        module: the module to replace.

    Returns:
        a ``DPLSTM`` with the same configuration and weights.
    """
    return convert(
        module,
        DPLSTM(
            module.input_size,
            module.hidden_size,
            proj_size=module.proj_size,
            **_common_kwargs(module)
        ),
    )

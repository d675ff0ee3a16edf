"""Check models for modules DP-SGD cannot train, and replace the fixable ones.

Importing the package registers the built-in validators and fixers.
"""

from opacus.validators import (  # noqa: F401 (imported to register validators and fixers)
    batch_norm,
    gru,
    instance_norm,
    lstm,
    multihead_attention,
    rnn,
)
from opacus.validators.module_validator import ModuleValidator
from opacus.validators.utils import register_module_fixer, register_module_validator

__all__ = ["ModuleValidator", "register_module_validator", "register_module_fixer"]

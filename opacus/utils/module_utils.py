"""Module walking, at its Opacus 1.6 path.

The code lives in ``opacus.grad_sample.module_utils``, beside the hooks that use it.
"""

from opacus.grad_sample.module_utils import (  # noqa: F401 (re-exports)
    are_state_dict_equal,
    clone_module,
    get_submodule,
    has_trainable_params,
    parametrized_modules,
    requires_grad,
    trainable_modules,
    trainable_parameters,
)

__all__ = [
    "are_state_dict_equal",
    "clone_module",
    "get_submodule",
    "has_trainable_params",
    "parametrized_modules",
    "requires_grad",
    "trainable_modules",
    "trainable_parameters",
]

"""Errors reported by ``ModuleValidator`` for modules that DP-SGD cannot train as they are."""


class UnsupportedError(ValueError):
    """Something in the model or its configuration is incompatible with DP-SGD."""


class UnsupportedModuleError(UnsupportedError):
    """A module cannot be trained with DP-SGD as it is."""


class NotYetSupportedModuleError(UnsupportedModuleError):
    """A module that could be supported but is not (no per-sample gradient for it yet)."""


class ShouldReplaceModuleError(UnsupportedModuleError):
    """A module that has a DP-compatible replacement (``ModuleValidator.fix`` swaps it in)."""


class UnsupportableModuleError(UnsupportedModuleError):
    """A module that can never be DP-compatible (e.g. it mixes information across samples)."""


class IllegalModuleConfigurationError(UnsupportedModuleError):
    """A supported module type in a configuration that breaks DP (e.g. running statistics)."""

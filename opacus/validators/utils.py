"""Decorators that register per-module-type validators and fixers with ``ModuleValidator``."""

from typing import Sequence, Union

from opacus.validators.module_validator import ModuleValidator

DEFAULT_MODULE_VALIDATOR = ModuleValidator


def _as_classes(target_class_or_classes):
    if isinstance(target_class_or_classes, type):
        return [target_class_or_classes]
    return list(target_class_or_classes)


def register_module_validator(
    target_class_or_classes: Union[type, Sequence[type]],
    validator_class: type = DEFAULT_MODULE_VALIDATOR,
):
    """Decorator: ``f(module) -> List[UnsupportedModuleError]`` validates the given type(s).

    Args:
        target_class_or_classes: the module class, or a sequence of classes, the decorated function
            checks.
        validator_class: the validator to register with (``ModuleValidator`` by default).
    """

    def decorator(f):
        for cls in _as_classes(target_class_or_classes):
            validator_class.VALIDATORS[cls] = f
        return f

    return decorator


def register_module_fixer(
    target_class_or_classes: Union[type, Sequence[type]],
    validator_class: type = DEFAULT_MODULE_VALIDATOR,
):
    """Decorator: ``f(module, **kwargs) -> nn.Module`` returns a DP-compatible replacement.

    Args:
        target_class_or_classes: the module class, or a sequence of classes, the decorated function
            fixes.
        validator_class: the validator to register with (``ModuleValidator`` by default).
    """

    def decorator(f):
        for cls in _as_classes(target_class_or_classes):
            validator_class.FIXERS[cls] = f
        return f

    return decorator

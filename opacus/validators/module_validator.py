"""``ModuleValidator``: find the modules DP-SGD cannot train, and swap in DP-compatible ones.

Validators and fixers are registered per module type (``register_module_validator`` /
``register_module_fixer`` in ``opacus.validators.utils``); lookups follow the type's MRO, so a
subclass of ``nn.BatchNorm2d`` is validated like ``nn.BatchNorm2d``.
"""

import inspect
import itertools
import logging
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from opacus.utils.module_utils import (
    clone_module,
    get_submodule,
    has_trainable_params,
    trainable_modules,
)
from opacus.validators.errors import (
    IllegalModuleConfigurationError,
    NotYetSupportedModuleError,
    UnsupportedModuleError,
)

logger = logging.getLogger(__name__)
# INFO, not NOTSET: the swap records reach handlers (e.g. on the root logger) even when the root
# logger's level is the default WARNING; the logger still propagates.
logger.setLevel(logging.INFO)

__all__ = [
    "IllegalModuleConfigurationError",
    "ModuleValidator",
    "UnsupportedModuleError",
    "clone_module",
    "get_submodule",
    "trainable_modules",
]


# Per type: f(module) -> a warning for a module that validate skips because nothing in it trains
# but that still matters for privacy (e.g. a non-learnable BatchNorm in training mode), or None.
FROZEN_MODULE_NOTICES: Dict[type, Callable[[nn.Module], Optional[str]]] = {}


def _lookup(registry: Dict[type, Callable], module_type: type) -> Optional[Callable]:
    for cls in module_type.__mro__:
        if cls in registry:
            return registry[cls]
    return None


def _located(error: UnsupportedModuleError, name: str, module: nn.Module):
    """The same error, its message prefixed with the submodule's path and type."""
    where = f"'{name}'" if name else "the model itself"
    located = type(error)(f"{where} ({type(module).__name__}): {error}")
    located.module_name = name
    return located


def _grad_samplers() -> Dict[type, Callable]:
    try:  # importing the package registers the built-in samplers
        import opacus.grad_sample  # noqa: F401
    except ImportError:
        pass
    from opacus.grad_sample.registry import GRAD_SAMPLERS

    return GRAD_SAMPLERS


class ModuleValidator:
    """Checks a model for modules incompatible with DP-SGD and fixes the fixable ones."""

    VALIDATORS: Dict[type, Callable[[nn.Module], List[UnsupportedModuleError]]] = {}
    FIXERS: Dict[type, Callable[..., nn.Module]] = {}

    @classmethod
    def validate(cls, module: nn.Module, *, strict: bool = False) -> List[UnsupportedModuleError]:
        """All problems found in ``module``, each naming the submodule path and the remedy.

        The first is an ``IllegalModuleConfigurationError`` if ``module`` itself is not in
        training mode. Then every submodule that trains (owns a trainable parameter, or for a
        container such as ``nn.TransformerEncoder`` holds one) is checked by the validator
        registered for its type; frozen or non-learnable layers (``BatchNorm(affine=False)``) are
        not reported (a WARNING is logged for those that still mix samples, see
        ``FROZEN_MODULE_NOTICES``). With ``strict=True`` they are raised instead (the error
        itself if there is one, else an ``UnsupportedModuleError`` listing them all).

        Args:
            module: the model to check.
            strict: raise the first problem instead of returning the list.

        Returns:
            the problems found (empty if none).

        Raises:
            UnsupportedModuleError: ``strict`` is True and a problem was found.
        """
        errors = []
        if not module.training:
            errors.append(
                IllegalModuleConfigurationError(
                    f"The model ({type(module).__name__}) must be in training mode to be trained "
                    "with DP-SGD; call model.train() before validating or making it private"
                )
            )
        flagged = set()
        for name, sub in module.named_modules():
            validator = _lookup(cls.VALIDATORS, type(sub))
            if validator is None:
                continue
            if not has_trainable_params(sub):
                notice = _lookup(FROZEN_MODULE_NOTICES, type(sub))
                message = None if notice is None else notice(sub)
                if message:
                    where = f"'{name}'" if name else "the model itself"
                    logger.warning("%s (%s): %s", where, type(sub).__name__, message)
                continue
            found = validator(sub)
            if found:
                flagged.add(name)
                errors.extend(_located(err, name, sub) for err in found)
        errors.extend(cls._unsupported_trainable_modules(module, flagged))
        if strict and errors:
            if len(errors) == 1:
                raise errors[0]
            raise UnsupportedModuleError(
                "The model is not compatible with DP-SGD:\n" + "\n".join(f"  - {e}" for e in errors)
            )
        return errors

    @classmethod
    def _unsupported_trainable_modules(cls, module: nn.Module, flagged) -> List:
        # Per-sample gradients of a module's own trainable parameters come from the sampler
        # registered for its type or else from the generic torch.func fallback, which runs the
        # module without its buffers' updates and so cannot handle modules that own buffers
        # (running statistics, caches): those need a registered sampler (same rule as
        # GradSampleModule's own check, so is_valid agrees with what the hooks can do).
        samplers = _grad_samplers()
        errors = []
        for name, sub in trainable_modules(module):
            if name in flagged or type(sub) in samplers:
                continue
            buffers = [n for n, _ in sub.named_buffers(recurse=False)]
            if buffers:
                own = [n for n, p in sub.named_parameters(recurse=False) if p.requires_grad]
                errors.append(
                    _located(
                        NotYetSupportedModuleError(
                            f"has trainable parameters {own} and buffers {buffers} but no "
                            "registered grad sampler, so its per-sample gradients cannot be "
                            "computed. Register one with opacus.grad_sample."
                            "register_grad_sampler, or freeze the module (requires_grad_(False))"
                        ),
                        name,
                        sub,
                    )
                )
        return errors

    @classmethod
    def is_valid(cls, module: nn.Module) -> bool:
        """True if ``validate`` finds no problem.

        Args:
            module: the model to check.

        Returns:
            True if ``validate`` finds no problem.
        """
        return len(cls.validate(module, strict=False)) == 0

    @classmethod
    def fix(cls, module: nn.Module, **kwargs) -> nn.Module:
        """A copy of ``module`` with every fixable submodule replaced; ``module`` is untouched.

        Each submodule that trains (see ``validate``) and has a fixer registered for its type is
        replaced by the fixer's result, moved to the old submodule's device; each swap is
        logged at INFO on this module's logger ("Replaced sub_module {name} : {old} with
        {new}"). ``kwargs`` go to the fixers that accept them (e.g. ``replace_bn_with_in=True``
        or ``num_groups`` for BatchNorm). A fixer's ``UnsupportedModuleError`` is raised with
        the submodule's path.

        Args:
            module: the model (not modified).

        Returns:
            the fixed copy.
        """
        fixed = clone_module(module)
        return cls._fix_tree(fixed, "", kwargs, {})

    @classmethod
    def _fix_tree(cls, module: nn.Module, name: str, kwargs, memo) -> nn.Module:
        # Children first: a container's fixer (e.g. nn.TransformerEncoder's) then sees them fixed.
        if id(module) in memo:  # a module shared at several places stays shared
            return memo[id(module)]
        # _modules, not named_children(): the latter skips repeats of a shared child.
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            path = f"{name}.{child_name}" if name else child_name
            new_child = cls._fix_tree(child, path, kwargs, memo)
            if new_child is not child:
                setattr(module, child_name, new_child)
        fixer = _lookup(cls.FIXERS, type(module))
        replacement = module
        if fixer is not None and has_trainable_params(module):
            replacement = _fix_one(fixer, module, name, kwargs)
        memo[id(module)] = replacement
        return replacement

    @classmethod
    def fix_and_validate(cls, module: nn.Module, **kwargs) -> nn.Module:
        """``fix`` then ``validate(strict=True)``; returns the fixed copy.

        Args:
            module: the model (not modified).

        Returns:
            the fixed copy, validated.
        """
        fixed = cls.fix(module, **kwargs)
        cls.validate(fixed, strict=True)
        return fixed


def _fix_one(fixer: Callable, module: nn.Module, name: str, kwargs) -> nn.Module:
    """``fixer(module)`` on ``module``'s device; errors name the submodule's path ``name``."""
    try:
        replacement = _call_fixer(fixer, module, kwargs)
    except UnsupportedModuleError as error:
        raise _located(error, name, module) from error
    except Exception as error:
        where = f"'{name}'" if name else "the model itself"
        error.add_note(f"(raised while fixing {where}: {type(module).__name__})")
        raise
    if replacement is not module:
        device = _device_of(module)
        if device is not None:
            replacement = replacement.to(device)
        logger.info("Replaced sub_module %s : %s with %s", name, module, replacement)
    return replacement


def _device_of(module: nn.Module) -> Optional[torch.device]:
    """Device of the module's first parameter or buffer (``None`` if it has neither)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return None


def _call_fixer(fixer: Callable, module: nn.Module, kwargs) -> nn.Module:
    params = inspect.signature(fixer).parameters.values()
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        return fixer(module, **kwargs)
    accepted = {p.name for p in params}
    return fixer(module, **{k: v for k, v in kwargs.items() if k in accepted})

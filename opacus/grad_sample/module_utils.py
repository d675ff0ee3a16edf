"""Small helpers for walking and copying ``nn.Module`` trees."""

import copy
import io
from typing import Dict, Iterable, Tuple

import torch
import torch.nn as nn


def parametrized_modules(module: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    """Submodules (including ``module`` itself) that own parameters directly, not via children.

    Args:
        module: the root module.

    Returns:
        ``(name, submodule)`` pairs.
    """
    for name, m in module.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            yield name, m


def trainable_modules(module: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    """Submodules that own at least one parameter with ``requires_grad=True`` directly.

    Args:
        module: the root module.

    Returns:
        ``(name, submodule)`` pairs.
    """
    for name, m in parametrized_modules(module):
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            yield name, m


def trainable_parameters(module: nn.Module) -> Iterable[Tuple[str, nn.Parameter]]:
    """Named parameters of ``module`` that require gradients.

    Args:
        module: the module.

    Returns:
        ``(name, parameter)`` pairs.
    """
    for name, p in module.named_parameters():
        if p.requires_grad:
            yield name, p


def requires_grad(module: nn.Module, *, recurse: bool = False) -> bool:
    """True if any parameter of ``module`` (direct only, unless ``recurse``) requires grad.

    Args:
        module: the module.
        recurse: also look at the parameters of its descendants.

    Returns:
        whether a parameter requires grad.
    """
    return any(p.requires_grad for p in module.parameters(recurse=recurse))


def has_trainable_params(module: nn.Module) -> bool:
    """True if ``module`` or any of its descendants has a parameter that requires grad.

    Args:
        module: the module.

    Returns:
        whether a parameter below it requires grad.
    """
    return requires_grad(module, recurse=True)


def clone_module(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` via ``torch.save``/``torch.load`` (falls back to deepcopy).

    Args:
        module: the module to copy.
        module: the module to copy.

    Returns:
        the copy.
    """
    buffer = io.BytesIO()
    try:
        torch.save(module, buffer)
    except Exception:  # modules holding unpicklable state: fall back to deepcopy
        return copy.deepcopy(module)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def get_submodule(module: nn.Module, target: str) -> nn.Module:
    """``module.get_submodule(target)``; the empty string names ``module`` itself.

    Args:
        module: the root module.
        target: the dotted path of the submodule (``""`` for ``module`` itself).

    Returns:
        the submodule.
    """
    if target == "":
        return module
    return module.get_submodule(target)


def are_state_dict_equal(sd1: Dict, sd2: Dict) -> bool:
    """True if both state dicts have the same keys and equal tensors under each key.

    Args:
        sd1: a state dict.
        sd2: another state dict.
    """
    if sd1.keys() != sd2.keys():
        return False
    for key, v1 in sd1.items():
        v2 = sd2[key]
        if torch.is_tensor(v1) != torch.is_tensor(v2):
            return False
        if torch.is_tensor(v1):
            if v1.shape != v2.shape or not torch.equal(v1.to(v2.device), v2):
                return False
        elif v1 != v2:
            return False
    return True

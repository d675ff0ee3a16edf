"""Let a DP layer load state dicts written by the ``torch.nn`` layer it replaces.

The DP layers keep their parameters in small submodules (``l0.ih.weight``) so that per-sample
gradients come from the ordinary hooks, while ``torch.nn`` names them flatly (``weight_ih_l0``).
``RenameParamsMixin`` maps the old names to the new ones on load (directly or nested inside a
bigger model) and resolves the old names as attributes, so code written for ``torch.nn`` keeps
working.
"""

from typing import Dict

import torch
import torch.nn as nn


def filter_out_old_keys(self, state_dict, prefix, local_metadata):
    """State-dict hook: drop ``prefix + old_name`` entries so only the new names are saved.

    ``self`` is the module the hook is registered on (it carries the rename map).
    """
    for old_name in getattr(self, "_rename_map", {}):
        state_dict.pop(prefix + old_name, None)


class RenameParamsMixin:
    """Mixin for an ``nn.Module`` whose parameters had other names in the layer it replaces.

    Call ``set_rename_map({old_name: new_name})`` in ``__init__`` after creating the submodules.
    """

    def set_rename_map(self, rename_map: Dict[str, str]):
        """Register ``{old_name: new_name}``; old names then load, and resolve as attributes."""
        self._rename_map = dict(rename_map)
        if not getattr(self, "_rename_hooks_registered", False):
            self._register_state_dict_hook(filter_out_old_keys)
            self.register_load_state_dict_pre_hook(_rename_on_load)
            self._rename_hooks_registered = True

    def _renamed(self, state_dict: Dict[str, torch.Tensor], prefix: str = ""):
        rename_map = getattr(self, "_rename_map", {})
        out = state_dict.__class__()
        for key, value in state_dict.items():
            local = key[len(prefix) :] if key.startswith(prefix) else None
            if local is not None and local in rename_map:
                key = prefix + rename_map[local]
            out[key] = value
        if hasattr(state_dict, "_metadata"):
            out._metadata = state_dict._metadata
        return out

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True):
        """``nn.Module.load_state_dict`` that also accepts the old (``torch.nn``) names."""
        return nn.Module.load_state_dict(self, self._renamed(state_dict), strict=strict)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            rename_map = self.__dict__.get("_rename_map", {})
            if name in rename_map:
                target = self
                for part in rename_map[name].split("."):
                    target = getattr(target, part)
                return target
            raise


def _rename_on_load(
    module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
):
    # Runs for nested loads too (a parent's load_state_dict never calls ours), renaming in place.
    renamed = module._renamed(state_dict, prefix)
    if list(renamed) != list(state_dict):
        state_dict.clear()
        state_dict.update(renamed)

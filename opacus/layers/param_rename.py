"""Give a DP layer the state-dict format of the ``torch.nn`` layer it replaces.

The DP layers keep their parameters in small submodules (``l0.ih.weight``) so that per-sample
gradients come from the ordinary hooks, while ``torch.nn`` names them flatly (``weight_ih_l0``).
``RenameParamsMixin`` saves state dicts under the old (``torch.nn``) names, in the old layer's
order, and loads both the old and the new names, whether the layer is saved or loaded on its own
or nested inside a bigger model. The old names also resolve as attributes, so code written for
``torch.nn`` keeps working. ``named_parameters()`` keeps the new names: the parameters live in
the submodules that the per-sample-gradient hooks see.
"""

from typing import Dict

import torch
import torch.nn as nn


def filter_out_old_keys(self, state_dict, prefix, local_metadata):
    """State-dict hook: keep only the new (internal) names, moving old-name entries to them.

    ``self`` is the module carrying the rename map. Entries ``prefix + old_name`` are removed;
    their value is stored under ``prefix + new_name`` unless that key is already present. Register
    it (``module.register_state_dict_post_hook``) after the mixin's own hook to save the internal
    format instead of the ``torch.nn`` one.

    Args:
        state_dict: the state dict being built.
        prefix: the module's key prefix.
        local_metadata: unused (the hook signature).
    """
    for old_name, new_name in getattr(self, "_rename_map", {}).items():
        if prefix + old_name in state_dict:
            value = state_dict.pop(prefix + old_name)
            state_dict.setdefault(prefix + new_name, value)


class RenameParamsMixin:
    """Mixin for an ``nn.Module`` whose parameters had other names in the layer it replaces.

    Call ``set_rename_map({old_name: new_name})`` in ``__init__`` after creating the submodules,
    listing the old names in the order the old layer saves them.
    """

    def set_rename_map(self, rename_map: Dict[str, str]):
        """Register ``{old_name: new_name}``: state dicts then use the old names (in this order),
        loading accepts both, and the old names resolve as attributes.

        Args:
            rename_map: ``{old_name: new_name}``.
        """
        self._rename_map = dict(rename_map)
        if not getattr(self, "_rename_hooks_registered", False):
            self.register_state_dict_post_hook(_save_old_names)
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
        """``nn.Module.load_state_dict`` accepting the old (``torch.nn``) and the new names.

        Args:
            state_dict: a state dict using the old or the new names.
            strict: require the keys to match exactly, as ``nn.Module.load_state_dict``.
        """
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


def _save_old_names(module, state_dict, prefix, local_metadata):
    """State-dict post-hook: store ``prefix + new_name`` entries as ``prefix + old_name``.

    Runs at every depth (a parent's ``state_dict`` calls each child's), right after the module's
    own entries were appended, so they are the last ones and re-inserting keeps their place.
    The values are moved, not copied (``keep_vars=True`` still gives the parameters).
    """
    rename_map = getattr(module, "_rename_map", {})
    new_names = {prefix + new: prefix + old for old, new in rename_map.items()}
    present = {key: state_dict.pop(key) for key in list(state_dict) if key in new_names}
    for old, new in rename_map.items():
        if prefix + new in present:
            state_dict[prefix + old] = present[prefix + new]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # the internal submodules are not part of the saved format
        for new in rename_map.values():
            parts = new.split(".")[:-1]
            for depth in range(1, len(parts) + 1):
                metadata.pop(prefix + ".".join(parts[:depth]), None)


def _rename_on_load(
    module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
):
    # Runs for nested loads too (a parent's load_state_dict never calls ours), renaming in place.
    renamed = module._renamed(state_dict, prefix)
    if list(renamed) != list(state_dict):
        state_dict.clear()
        state_dict.update(renamed)

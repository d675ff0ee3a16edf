"""RenameParamsMixin: old (torch.nn) names load, resolve as attributes, and are never saved."""

import pytest
import torch
import torch.nn as nn

from opacus.layers.param_rename import RenameParamsMixin, filter_out_old_keys


class Renamed(RenameParamsMixin, nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(2, 3)
        self.set_rename_map({"weight": "inner.weight", "bias": "inner.bias"})


def test_old_names_load_directly_and_nested():
    torch.manual_seed(0)
    source = nn.Linear(2, 3)
    layer = Renamed()
    layer.load_state_dict(source.state_dict())
    torch.testing.assert_close(layer.inner.weight, source.weight)
    outer = nn.Sequential(Renamed())
    outer.load_state_dict(nn.Sequential(source).state_dict())  # "0.weight" -> "0.inner.weight"
    torch.testing.assert_close(outer[0].inner.bias, source.bias)


def test_old_names_resolve_as_attributes_and_are_not_saved():
    layer = Renamed()
    assert layer.weight is layer.inner.weight
    assert set(layer.state_dict()) == {"inner.weight", "inner.bias"}
    with pytest.raises(AttributeError):
        layer.no_such_name


def test_filter_out_old_keys_drops_aliases():
    layer = Renamed()
    state = {"p.weight": 1, "p.inner.weight": 2, "p.other": 3}
    filter_out_old_keys(layer, state, "p.", {})
    assert state == {"p.inner.weight": 2, "p.other": 3}


def test_strict_loading_still_reports_mismatches():
    layer = Renamed()
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"weight": torch.zeros(3, 2)})
    layer.load_state_dict({"weight": torch.ones(3, 2)}, strict=False)
    assert torch.equal(layer.inner.weight, torch.ones(3, 2))

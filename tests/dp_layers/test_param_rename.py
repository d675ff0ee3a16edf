"""RenameParamsMixin: state dicts use the old (torch.nn) names; both old and new names load."""

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from opacus.layers.param_rename import RenameParamsMixin, filter_out_old_keys


class Renamed(RenameParamsMixin, nn.Module):
    """An nn.Linear(2, 3) whose parameters live in a submodule; bias listed first on purpose."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(2, 3)
        self.set_rename_map({"bias": "inner.bias", "weight": "inner.weight"})


def test_old_names_load_directly_and_nested():
    torch.manual_seed(0)
    source = nn.Linear(2, 3)
    layer = Renamed()
    layer.load_state_dict(source.state_dict())
    torch.testing.assert_close(layer.inner.weight, source.weight)
    outer = nn.Sequential(Renamed())
    outer.load_state_dict(nn.Sequential(source).state_dict())  # "0.weight" -> "0.inner.weight"
    torch.testing.assert_close(outer[0].inner.bias, source.bias)


def test_new_names_load_directly_and_nested():
    layer, other = Renamed(), Renamed()
    internal = {n: p.detach() for n, p in layer.named_parameters()}
    assert set(internal) == {"inner.weight", "inner.bias"}
    other.load_state_dict(internal)
    torch.testing.assert_close(other.inner.weight, layer.inner.weight)
    outer = nn.Sequential(nn.Identity(), Renamed())
    outer.load_state_dict({f"1.{n}": t for n, t in internal.items()})
    torch.testing.assert_close(outer[1].inner.bias, layer.inner.bias)


def test_saved_under_old_names_in_map_order_at_any_depth():
    layer = Renamed()
    assert list(layer.state_dict()) == ["bias", "weight"]
    assert layer.weight is layer.inner.weight  # old names resolve as attributes
    with pytest.raises(AttributeError):
        layer.no_such_name
    outer = nn.Sequential(nn.Linear(1, 1), Renamed(), nn.Linear(1, 1))
    assert list(outer.state_dict()) == [
        "0.weight",
        "0.bias",
        "1.bias",
        "1.weight",
        "2.weight",
        "2.bias",
    ]
    # the internal submodule is not part of the saved format
    assert "1.inner" not in outer.state_dict()._metadata
    # keep_vars=True gives the parameters themselves
    assert outer.state_dict(keep_vars=True)["1.weight"] is outer[1].inner.weight
    fresh = nn.Sequential(nn.Linear(1, 1), Renamed(), nn.Linear(1, 1))
    fresh.load_state_dict(outer.state_dict())
    torch.testing.assert_close(fresh[1].inner.weight, outer[1].inner.weight)


def test_filter_out_old_keys_moves_aliases_to_new_names():
    layer = Renamed()
    state = OrderedDict([("p.weight", 1), ("p.inner.weight", 2), ("p.bias", 3), ("p.other", 4)])
    filter_out_old_keys(layer, state, "p.", {})
    assert state == {"p.inner.weight": 2, "p.other": 4, "p.inner.bias": 3}
    # Registered after the mixin's hook, it saves the internal format instead.
    layer.register_state_dict_post_hook(filter_out_old_keys)
    assert set(layer.state_dict()) == {"inner.weight", "inner.bias"}


def test_strict_loading_still_reports_mismatches():
    layer = Renamed()
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"weight": torch.zeros(3, 2)})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        layer.load_state_dict({**layer.state_dict(), "bogus": torch.zeros(1)})
    layer.load_state_dict({"weight": torch.ones(3, 2)}, strict=False)
    assert torch.equal(layer.inner.weight, torch.ones(3, 2))

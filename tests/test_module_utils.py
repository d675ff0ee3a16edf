"""``opacus.utils.module_utils`` against hand-built expectations on a small model tree."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.utils.module_utils import (
    are_state_dict_equal,
    clone_module,
    get_submodule,
    has_trainable_params,
    parametrized_modules,
    requires_grad,
    trainable_modules,
    trainable_parameters,
)


class _WithDirectParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        self.child = nn.Linear(2, 2)

    def forward(self, x):
        return self.child(x) * self.scale


def _tree():
    torch.manual_seed(0)
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    half = nn.Linear(2, 2)
    half.bias.requires_grad_(False)
    return nn.Sequential(
        nn.Linear(3, 2), nn.ReLU(), nn.Sequential(frozen, half), _WithDirectParam()
    )


def test_parametrized_and_trainable_modules():
    model = _tree()
    assert [n for n, _ in parametrized_modules(model)] == ["0", "2.0", "2.1", "3", "3.child"]
    assert [n for n, _ in trainable_modules(model)] == ["0", "2.1", "3", "3.child"]
    for name, m in parametrized_modules(model):
        assert m is model.get_submodule(name)


def test_trainable_parameters():
    model = _tree()
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, _ in trainable_parameters(model)] == expected
    assert "2.1.bias" not in expected and "2.0.weight" not in expected
    assert all(p.requires_grad for _, p in trainable_parameters(model))


def test_requires_grad_direct_and_recursive():
    model = _tree()
    assert not requires_grad(model)  # a Sequential owns no parameters itself
    assert requires_grad(model, recurse=True)
    assert not requires_grad(model[2][0], recurse=True)
    assert requires_grad(model[2][1])  # weight trainable, bias frozen
    assert requires_grad(model[3]) and not requires_grad(model[1], recurse=True)
    assert has_trainable_params(model) and has_trainable_params(model[2])
    assert not has_trainable_params(model[2][0]) and not has_trainable_params(model[1])


def test_clone_module_is_deep_and_equal():
    model = _tree()
    clone = clone_module(model)
    assert clone is not model
    assert are_state_dict_equal(clone.state_dict(), model.state_dict())
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), clone.named_parameters()):
        assert n1 == n2 and p1 is not p2 and p1.requires_grad == p2.requires_grad
    x = torch.randn(4, 3)
    torch.testing.assert_close(clone(x), model(x))
    with torch.no_grad():
        clone[0].weight.add_(1.0)
    assert not torch.equal(clone[0].weight, model[0].weight)


def test_clone_module_falls_back_to_deepcopy():
    model = nn.Linear(2, 2)
    model.unpicklable = lambda: None  # torch.save cannot pickle a lambda
    clone = clone_module(model)
    assert clone is not model and torch.equal(clone.weight, model.weight)


def test_get_submodule():
    model = _tree()
    assert get_submodule(model, "") is model
    assert get_submodule(model, "2.1") is model[2][1]
    assert get_submodule(model, "3.child") is model[3].child
    with pytest.raises(AttributeError):
        get_submodule(model, "9")


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 100))
def test_are_state_dict_equal(shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g)
    sd = {"a": t, "b": 3, "c": torch.arange(4)}
    assert are_state_dict_equal(sd, {"a": t.clone(), "b": 3, "c": torch.arange(4)})
    changed = t.clone()
    changed.view(-1)[0] += 1
    assert not are_state_dict_equal(sd, {"a": changed, "b": 3, "c": torch.arange(4)})
    assert not are_state_dict_equal(sd, {"a": t, "b": 4, "c": torch.arange(4)})
    assert not are_state_dict_equal(sd, {"a": t, "b": 3})
    assert not are_state_dict_equal(sd, {"a": t.unsqueeze(0), "b": 3, "c": torch.arange(4)})
    assert not are_state_dict_equal(sd, {"a": t, "b": torch.tensor(3), "c": torch.arange(4)})

"""IAccountant behaviour shared by all accountants, the registry and get_noise_multiplier."""

import ast
import copy
import importlib.util
import math
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import opacus.accountants as accountants
from opacus.accountants import (
    GaussianAccountant,
    IAccountant,
    PRVAccountant,
    RDPAccountant,
    create_accountant,
    register_accountant,
)
from opacus.accountants.utils import get_noise_multiplier, steps_from_epochs

ALL = [RDPAccountant, PRVAccountant, GaussianAccountant]
MECHANISMS = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}


@pytest.mark.parametrize("cls", ALL)
def test_history_merges_consecutive_equal_steps(cls):
    acc = cls()
    assert len(acc) == 0 and acc.history == []
    steps = [(1.0, 0.01)] * 3 + [(1.5, 0.01)] + [(1.0, 0.01)] * 2 + [(1.0, 0.02)]
    for sigma, q in steps:
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert acc.history == [(1.0, 0.01, 3), (1.5, 0.01, 1), (1.0, 0.01, 2), (1.0, 0.02, 1)]
    assert len(acc) == len(steps)


BAD_EVENTS = [
    (-1.0, 0.1, "noise_multiplier"),
    (float("nan"), 0.1, "noise_multiplier"),
    (float("inf"), 0.1, "noise_multiplier"),
    ("1", 0.1, "noise_multiplier"),
    (True, 0.1, "noise_multiplier"),
    (torch.tensor([1.0, 2.0]), 0.1, "noise_multiplier"),
    (torch.tensor(-1.0), 0.1, "noise_multiplier"),
    (torch.tensor(float("inf")), 0.1, "noise_multiplier"),
    (None, 0.1, "noise_multiplier"),
    (1.0, -0.1, "sample_rate"),
    (1.0, 1.5, "sample_rate"),
    (1.0, float("nan"), "sample_rate"),
    (1.0, torch.tensor(2.0), "sample_rate"),
    (1.0, np.array([0.1, 0.2]), "sample_rate"),
]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("sigma,q,name", BAD_EVENTS)
def test_step_rejects_bad_events(cls, sigma, q, name):
    acc = cls()
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.step: {name}"):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert acc.history == []


@pytest.mark.parametrize("cls", ALL)
def test_step_accepts_one_element_tensors_and_numpy_scalars(cls):
    """A 0-d tensor (e.g. a scheduled noise multiplier) is recorded as a float."""
    acc = cls()
    acc.step(noise_multiplier=torch.tensor(1.0), sample_rate=torch.tensor(0.25))
    acc.step(noise_multiplier=np.float32(1.0), sample_rate=np.float64(0.25))
    acc.step(noise_multiplier=torch.tensor([1.0], dtype=torch.float64), sample_rate=0.25)
    acc.step(noise_multiplier=1, sample_rate=np.array(0.25))
    assert acc.history == [(1.0, 0.25, 4)]
    sigma, q, _ = acc.history[0]
    assert type(sigma) is float and type(q) is float
    reference = cls()
    reference.history = [(1.0, 0.25, 4)]
    assert acc.get_epsilon(1e-5) == reference.get_epsilon(1e-5)
    # The optimizer hook passes the optimizer's value through: a tensor works there too.
    hook = acc.get_optimizer_hook_fn(sample_rate=0.25)
    hook(SimpleNamespace(noise_multiplier=torch.tensor(1.0), accumulated_iterations=1))
    assert acc.history == [(1.0, 0.25, 5)]


@pytest.mark.parametrize("cls", ALL)
def test_state_dict_round_trip(cls):
    acc = cls()
    for _ in range(5):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    state = acc.state_dict()
    assert state == {"history": [(1.0, 0.01, 5)], "mechanism": cls.mechanism()}
    state["history"].append((9.0, 0.5, 1))  # a copy, not a view
    assert acc.history == [(1.0, 0.01, 5)]
    fresh = cls()
    fresh.load_state_dict(acc.state_dict())
    assert fresh.history == acc.history
    assert fresh.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    dest = {"other": 1}
    assert acc.state_dict(dest) is dest and dest["other"] == 1
    assert dest["history"] == acc.history
    # Lists (e.g. after a JSON round trip) come back as tuples.
    fresh.load_state_dict({"history": [[2.0, 0.1, 3]], "mechanism": cls.mechanism()})
    assert fresh.history == [(2.0, 0.1, 3)]


@pytest.mark.parametrize(
    "state,match",
    [
        (None, "non-empty"),
        ({}, "non-empty"),
        ([("history", [])], "non-empty"),
        ({"mechanism": "rdp"}, "'history'"),
        ({"history": [(1.0, 0.1, 1)]}, "'mechanism'"),
        ({"history": [], "mechanism": "prv"}, "'prv'"),
        ({"history": [(1.0, 2.0, 1)], "mechanism": "rdp"}, "sample_rate"),
        ({"history": [(-1.0, 0.1, 1)], "mechanism": "rdp"}, "noise_multiplier"),
        ({"history": [(1.0, 0.1, 1.5)], "mechanism": "rdp"}, "num_steps"),
        ({"history": [(1.0, 0.1, -1)], "mechanism": "rdp"}, "num_steps"),
        ({"history": [(1.0, 0.1)], "mechanism": "rdp"}, "history entry"),
    ],
)
def test_load_state_dict_rejects_bad_states(state, match):
    acc = RDPAccountant()
    acc.step(noise_multiplier=2.0, sample_rate=0.5)
    with pytest.raises(ValueError, match=match):
        acc.load_state_dict(state)
    assert acc.history == [(2.0, 0.5, 1)]  # unchanged


def test_state_dict_round_trip_continues_accounting():
    """Contract cluster 6: 1250 steps, save, load into a fresh accountant, 1000 more steps."""
    acc = RDPAccountant()
    for _ in range(1250):
        acc.step(noise_multiplier=1.5, sample_rate=0.04)
    state = acc.state_dict()
    assert state["mechanism"] == "rdp" and state["history"] == acc.history
    assert state["history"] is not acc.history
    fresh = RDPAccountant()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == acc.state_dict()
    for _ in range(1000):
        fresh.step(noise_multiplier=1.5, sample_rate=0.04)
    assert fresh.history == [(1.5, 0.04, 2250)]
    assert fresh.get_epsilon(delta=1e-5) == pytest.approx(7.32911117143, abs=1e-10)
    acc.load_state_dict({"history": [[1.5, 0.04, 1250]], "mechanism": "rdp"})
    assert acc.history == [(1.5, 0.04, 1250)]


@pytest.mark.parametrize("cls", ALL)
def test_optimizer_hook_steps_with_accumulated_rate(cls):
    acc = cls()
    hook = acc.get_optimizer_hook_fn(sample_rate=0.01)
    hook(SimpleNamespace(noise_multiplier=1.2, accumulated_iterations=1))
    hook(SimpleNamespace(noise_multiplier=1.2, accumulated_iterations=1))
    hook(SimpleNamespace(noise_multiplier=1.2, accumulated_iterations=4))
    assert acc.history == [(1.2, 0.01, 2), (1.2, 0.04, 1)]
    with pytest.raises(ValueError, match="sample_rate"):
        hook(SimpleNamespace(noise_multiplier=1.2, accumulated_iterations=200))


def test_registry():
    for name, cls in MECHANISMS.items():
        acc = create_accountant(name)
        assert type(acc) is cls and cls.mechanism() == name
    with pytest.raises(ValueError, match="unknown accountant"):
        create_accountant("moments")

    class Custom(RDPAccountant):
        @classmethod
        def mechanism(cls):
            return "custom-test"

    register_accountant("custom-test", Custom)
    assert type(create_accountant("custom-test")) is Custom
    with pytest.raises(ValueError, match="already registered"):
        register_accountant("custom-test", Custom)
    register_accountant("custom-test", RDPAccountant, force=True)
    assert type(create_accountant("custom-test")) is RDPAccountant
    with pytest.raises(ValueError, match="IAccountant"):
        register_accountant("bad", object)
    with pytest.raises(ValueError, match="already registered"):
        register_accountant("rdp", Custom)


def test_interface_is_abstract_and_exported():
    with pytest.raises(TypeError):
        IAccountant()
    assert set(accountants.__all__) >= {
        "IAccountant",
        "RDPAccountant",
        "PRVAccountant",
        "GaussianAccountant",
        "create_accountant",
        "register_accountant",
    }
    from opacus.accountants.analysis.prv import domain

    assert domain.RDPAccountant is RDPAccountant
    if importlib.util.find_spec("opacus.optimizers.optimizer") is not None:
        from opacus.accountants.accountant import DPOptimizer
        from opacus.optimizers.optimizer import DPOptimizer as Expected

        assert DPOptimizer is Expected


def _runtime_imports(tree):
    """Imported module names, skipping ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        stack.extend(ast.iter_child_nodes(node))


def test_accountants_do_not_import_torch_or_optimizers():
    root = pathlib.Path(accountants.__file__).parent
    files = list(root.rglob("*.py"))
    assert len(files) >= 14
    for path in files:
        for name in _runtime_imports(ast.parse(path.read_text())):
            assert not name.startswith("torch"), f"{path} imports {name}"
            assert not name.startswith("opacus.optimizers"), f"{path} imports {name}"


# ---------------------------------------------------------------- get_noise_multiplier
@pytest.mark.parametrize(
    "accountant,q,steps,target",
    [
        ("rdp", 0.01, 1000, 1.0),
        ("rdp", 0.001, 100_000, 8.0),
        ("rdp", 1.0, 10, 5.0),
        ("gdp", 0.001, 100_000, 1.5),
        ("gdp", 0.02, 500, 3.0),
        ("prv", 0.01, 1000, 2.0),
        ("prv", 0.2, 50, 4.0),
    ],
)
def test_noise_multiplier_lands_just_below_target(accountant, q, steps, target):
    tol = 0.01
    sigma = get_noise_multiplier(
        target_epsilon=target,
        target_delta=1e-5,
        sample_rate=q,
        steps=steps,
        accountant=accountant,
        epsilon_tolerance=tol,
    )
    acc = create_accountant(accountant)
    acc.history = [(sigma, q, steps)]
    eps = acc.get_epsilon(1e-5)
    assert target - tol <= eps <= target


@pytest.mark.slow
def test_noise_multiplier_prv_many_steps():
    sigma = get_noise_multiplier(
        target_epsilon=1.5, target_delta=1e-5, sample_rate=1e-3, steps=100_000, accountant="prv"
    )
    acc = PRVAccountant()
    acc.history = [(sigma, 1e-3, 100_000)]
    assert 1.49 <= acc.get_epsilon(1e-5) <= 1.5


@settings(max_examples=10, deadline=None)
@given(
    target=st.floats(0.3, 20.0),
    q=st.floats(1e-3, 1.0),
    steps=st.integers(1, 5000),
    accountant=st.sampled_from(["rdp", "gdp"]),
)
def test_noise_multiplier_property(target, q, steps, accountant):
    try:
        sigma = get_noise_multiplier(
            target_epsilon=target,
            target_delta=1e-5,
            sample_rate=q,
            steps=steps,
            accountant=accountant,
        )
    except ValueError as err:  # only allowed when the target is below the conversion floor
        assert "unreachable" in str(err)
        return
    acc = create_accountant(accountant)
    acc.history = [(sigma, q, steps)]
    eps = acc.get_epsilon(1e-5)
    assert eps <= target
    assert eps >= target - 0.01 or sigma <= 1e-3


def test_epochs_are_converted_to_steps():
    by_epochs = get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01, epochs=10
    )
    by_steps = get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01, steps=1000
    )
    assert by_epochs == by_steps


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epochs=1, steps=100), "exactly one"),
        (dict(), "exactly one"),
        (dict(steps=100, sample_rate=0.0), "sample_rate"),
        (dict(steps=100, sample_rate=1.5), "sample_rate"),
        (dict(steps=100, target_delta=0.0), "target_delta"),
        (dict(steps=100, target_epsilon=-1.0), "target_epsilon"),
        (dict(steps=100, target_epsilon=math.inf), "target_epsilon"),
        (dict(steps=0), "steps"),
        (dict(steps=100, epsilon_tolerance=0.0), "epsilon_tolerance"),
        (dict(steps=100, accountant="nope"), "unknown accountant"),
        (dict(steps=100, target_epsilon=0.01), "unreachable"),
    ],
)
def test_noise_multiplier_errors(kwargs, match):
    args = dict(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        get_noise_multiplier(**args)


@pytest.mark.parametrize("cls", ALL)
def test_steps_that_release_nothing_cost_nothing(cls):
    acc = cls()
    acc.step(noise_multiplier=0.0, sample_rate=0.0)
    acc.step(noise_multiplier=0.0, sample_rate=0.0)
    assert len(acc) == 2
    # step() refuses an infinite noise multiplier; a history set by hand may still hold one.
    baseline = cls()
    baseline.history = [(float("inf"), 0.5, 1)]
    assert acc.get_epsilon(1e-5) == baseline.get_epsilon(1e-5) == 0.0


def test_accountants_are_copyable():
    acc = PRVAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.1)
    clone = copy.deepcopy(acc)
    clone.step(noise_multiplier=1.0, sample_rate=0.1)
    assert len(acc) == 1 and len(clone) == 2


# ---------------------------------------------------------------- Opacus 1.6's search, exactly
@pytest.mark.parametrize(
    "accountant,schedule,expected",
    [
        ("rdp", dict(epochs=90), 1.416015625),
        ("rdp", dict(steps=2000), 1.356201171875),
        ("gdp", dict(epochs=90), 1.3232421875),
        ("prv", dict(steps=2000), 1.29150390625),
        ("prv", dict(epochs=90), 1.34765625),
    ],
)
def test_noise_multiplier_reference_values(accountant, schedule, expected):
    """Contract cluster 4: delta 1e-5, q 0.04, target eps 8 (dyadic results, compared exactly)."""
    sigma = get_noise_multiplier(
        target_epsilon=8.0,
        target_delta=1e-5,
        sample_rate=0.04,
        accountant=accountant,
        **schedule,
    )
    assert sigma == expected


class _Recording(IAccountant):
    """eps(sigma) = SCALE / sigma, recording every sigma evaluated."""

    SCALE = 100.0
    calls = []

    def step(self, *, noise_multiplier, sample_rate):
        self._record(noise_multiplier, sample_rate)

    @classmethod
    def mechanism(cls):
        return "recording-test"

    def get_epsilon(self, delta, **kwargs):
        ((sigma, _, _),) = self.history
        type(self).calls.append(sigma)
        return self.SCALE / sigma


def _search_with_inverse_eps(scale, target, tolerance=0.01):
    register_accountant("recording-test", _Recording, force=True)
    _Recording.SCALE = scale
    _Recording.calls = []
    sigma = get_noise_multiplier(
        target_epsilon=target,
        target_delta=1e-5,
        sample_rate=0.1,
        steps=10,
        accountant="recording-test",
        epsilon_tolerance=tolerance,
    )
    return sigma, list(_Recording.calls)


def test_search_doubles_from_ten_then_bisects_on_zero_to_high():
    # eps = 100 / sigma, target 8 (sigma* = 12.5): 20 is already below the target, then
    # bisection on [0, 20]: 10 (eps 10, too much: low), 15 (6.67: high), 12.5 (= target: low), ...
    sigma, calls = _search_with_inverse_eps(100.0, 8.0)
    assert calls[:4] == [20.0, 10.0, 15.0, 12.5]
    low, high = 0.0, 20.0
    for mid in calls[1:]:  # every later call is the midpoint of the current [low, high] ...
        assert 8.0 - 100.0 / high > 0.01  # ... made only while eps(high) is not yet close
        assert mid == (low + high) / 2
        if 100.0 / mid < 8.0:
            high = mid
        else:
            low = mid
    assert sigma == high
    assert 8.0 - 0.01 <= 100.0 / sigma < 8.0
    # Larger noise needed: 20, 40, 80 (eps 1000 / 80 = 12.5 > 8), 160, then bisect on [0, 160].
    sigma, calls = _search_with_inverse_eps(1000.0, 8.0)
    assert calls[:5] == [20.0, 40.0, 80.0, 160.0, 80.0]
    assert (sigma * 2**20 / 160.0).is_integer()  # a dyadic fraction of 160
    assert 8.0 - 0.01 <= 1000.0 / sigma < 8.0


def test_search_gives_up_beyond_a_million():
    with pytest.raises(ValueError, match="unreachable"):
        _search_with_inverse_eps(1e12, 1.0)
    assert _Recording.calls == [10.0 * 2**i for i in range(1, 18)]  # up to 1,310,720 > 1e6


@pytest.mark.parametrize(
    "epochs,q,steps", [(90, 0.04, 2250), (1, 0.06, 16), (1, 0.3, 3), (2.5, 0.1, 25), (1, 1.0, 1)]
)
def test_steps_from_epochs_truncates(epochs, q, steps):
    assert steps_from_epochs(epochs, q) == steps == int(epochs / q)
    assert type(steps_from_epochs(epochs, q)) is int


@pytest.mark.parametrize(
    "epochs,q,match",
    [(0, 0.1, "epochs"), (-1, 0.1, "epochs"), (math.inf, 0.1, "epochs"), (1, 0.0, "sample_rate")],
)
def test_steps_from_epochs_errors(epochs, q, match):
    with pytest.raises(ValueError, match=f"steps_from_epochs: {match}"):
        steps_from_epochs(epochs, q)


def test_accountants_code_is_simple():
    """Issue 17: every function in opacus/accountants has McCabe complexity <= 10."""
    mccabe = pytest.importorskip("mccabe")  # flake8's; absent where flake8 is not installed
    root = pathlib.Path(accountants.__file__).parent
    too_complex = []
    for path in root.rglob("*.py"):
        tree = compile(path.read_text(), str(path), "exec", ast.PyCF_ONLY_AST)
        visitor = mccabe.PathGraphingAstVisitor()
        visitor.preorder(tree, visitor)
        too_complex += [
            f"{path.name}:{graph.entity} ({graph.complexity()})"
            for graph in visitor.graphs.values()
            if graph.complexity() > 10
        ]
    assert too_complex == []

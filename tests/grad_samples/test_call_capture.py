"""The call-capture state of the hooks (opacus.grad_sample.call_capture.CallCapture): on its own,
and owned by the hooks objects, which keep none of it themselves."""

import gc
import weakref

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.call_capture import CallCapture
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from tests.oracle import brute_force_grad_samples

# What GradSampleHooks held itself before the split; CallCapture owns it now.
MOVED = (
    "_activations",
    "_max_batch_len",
    "_firing_call",
    "_pop_call",
    "_forget_calls",
    "_prune_orphaned_calls",
    "_count_calls",
)


class _Twice(nn.Module):
    """One Linear called twice per forward (as an RNN cell is per time step)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def _hooks_objects():
    torch.manual_seed(0)
    return [
        GradSampleModule(_Twice(), loss_reduction="sum"),
        GradSampleHooks(_Twice(), loss_reduction="sum"),
        GradSampleModuleFastGradientClipping(_Twice(), max_grad_norm=1.0, loss_reduction="sum"),
    ]


# ------------------------------------------------------------------- the split
@pytest.mark.parametrize("index", range(3))
def test_the_hooks_hold_no_call_capture_state_of_their_own(index):
    hooks = _hooks_objects()[index]
    assert isinstance(hooks._capture, CallCapture)
    for name in MOVED:
        assert not hasattr(hooks, name), name
        assert name not in vars(hooks), name


def _model_of(hooks):
    return hooks._module


def test_capture_is_empty_after_a_finished_backward_and_grads_match_the_oracle():
    model, x = _Twice(), torch.randn(4, 3)
    expected = brute_force_grad_samples(model, x)  # before any hook is attached
    gsm = GradSampleModule(model, loss_reduction="sum")
    out = gsm(x)
    capture = gsm._capture
    assert capture.counts() == {model.lin: 2}
    assert capture.count(model.lin) == 2 and capture.max_batch_len(model.lin) == 4
    assert all(p._forward_counter == 2 for p in model.parameters())
    out.sum().backward()
    assert capture.counts() == {} and capture.firing is None
    assert all(p._forward_counter == 0 for p in model.parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[name])
    gsm.zero_grad()
    assert gsm._capture is capture and capture.counts() == {}


def test_forget_drops_a_forward_that_will_not_be_backpropagated():
    gsm = GradSampleModule(_Twice(), loss_reduction="sum")
    model = _model_of(gsm)
    out = gsm(torch.randn(2, 3))
    gsm._capture.forget()
    assert gsm._capture.counts() == {}
    assert all(p._forward_counter == 0 for p in model.parameters())
    out.sum().backward()  # the dropped calls' output hooks do nothing
    assert all(p.grad_sample is None for p in model.parameters())
    assert all(p.grad is not None for p in model.parameters())


def test_remove_hooks_leaves_a_fresh_capture():
    gsm = GradSampleModule(_Twice(), loss_reduction="sum")
    gsm(torch.randn(2, 3))
    old = gsm._capture
    gsm.remove_hooks()
    assert gsm._capture is not old and gsm._capture.counts() == {}
    assert old.counts() == {}  # the removed handles forgot the pending calls


def test_a_refused_ghost_pass_forgets_the_unmeasured_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, loss_reduction="sum")
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=6,
        loss_reduction="sum",
    )
    criterion = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), loss_reduction="sum")
    stray = gsm(torch.randn(6, 4))  # kept, never differentiated: no norm for its calls
    loss = criterion(gsm(torch.randn(6, 4)), torch.randint(0, 3, (6,)))
    with pytest.raises(RuntimeError, match="no per-sample norm"):
        loss.backward()
    assert gsm._capture.counts() == {}
    assert all(p._forward_counter == 0 for p in model.parameters())
    del stray
    # The next step runs as usual and leaves nothing behind.
    opt.zero_grad()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    criterion(gsm(x), y).backward()
    assert gsm._capture.counts() == {} and gsm._capture.firing is None


# ------------------------------------------------------------------- on its own
class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)


class _Hook:
    """Stands in for a call's output hook (weakly referenced by the call)."""


def _capture():
    return CallCapture(lambda module: module.parameters())


def test_capture_counts_calls_per_trainable_parameter_and_keeps_the_largest_batch():
    cap, m = _capture(), _Layer()
    first = cap.capture(m, ["a1"], 5)
    second = cap.capture(m, ["a2"], 3)  # a later time step of a packed sequence
    assert list(first) == ["a1"] and list(second) == ["a2"] and first.hook is None
    assert cap.counts() == {m: 2} and cap.max_batch_len(m) == 5
    assert m.w._forward_counter == 2 and not hasattr(m.frozen, "_forward_counter")


def test_pop_takes_the_firing_call_else_the_latest():
    cap, m = _capture(), _Layer()
    first, second, third = (cap.capture(m, [f"a{i}"], 4) for i in range(3))
    cap.firing = first
    assert cap.answerable(m) == 3
    assert cap.pop(m) is first
    cap.firing = None
    assert cap.pop(m) is third
    assert cap.count(m) == 1 and m.w._forward_counter == 1
    assert cap.release(m) == 4 and cap.counts() == {m: 1}  # still one pending: kept
    assert cap.pop(m) is second
    assert cap.release(m) == 4 and cap.counts() == {} and m.w._forward_counter == 0


def test_a_dropped_firing_call_is_not_answerable():
    cap, m = _capture(), _Layer()
    old = cap.capture(m, ["old"], 2)
    cap.forget([m])
    cap.capture(m, ["new"], 2)
    cap.firing = old  # the output hook of a call whose inputs were dropped
    assert cap.answerable(m) == 0
    cap.firing = None
    assert cap.answerable(m) == 1 and cap.answerable(_Layer()) == 0


def test_prune_drops_calls_whose_output_hook_is_gone():
    cap, m, other = _capture(), _Layer(), _Layer()
    alive, dead = _Hook(), _Hook()
    kept = cap.capture(m, ["kept"], 3)
    kept.hook = weakref.ref(alive)
    gone = cap.capture(m, ["gone"], 3)
    gone.hook = weakref.ref(dead)
    cap.capture(m, ["no output hook"], 3)  # an output that needed no gradient
    cap.capture(other, ["x"], 7)
    del dead
    gc.collect()
    cap.prune_orphans()
    assert cap.counts() == {m: 1} and m.w._forward_counter == 1
    assert other.w._forward_counter == 0
    assert cap.pop(m) is kept


def test_forget_some_or_all_modules():
    cap, a, b = _capture(), _Layer(), _Layer()
    cap.capture(a, ["a"], 1)
    cap.capture(b, ["b"], 2)
    cap.capture(b, ["b"], 2)
    cap.forget([a, _Layer()])  # a module without calls is ignored
    assert cap.counts() == {b: 2} and a.w._forward_counter == 0
    cap.forget()
    assert cap.counts() == {} and b.w._forward_counter == 0
    with pytest.raises(KeyError):
        cap.max_batch_len(b)

"""Release once with ghost clipping (issue 16 items 1-3): a clipped sum enters one released
update only.  Misuse that would release a batch again raises; correct loops keep every sample's
influence on the released updates within the clipping bound C (brute force: the whole run
repeated without that sample)."""

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from tests.optimizers.dp_reference import small_model

C = 0.3


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64) * 3, torch.randint(
        0, 3, (n,), generator=g
    )


class _Run:
    """A ghost-clipping setup whose released updates (``p.grad`` handed to the wrapped
    optimizer at each real step) and accountant steps are recorded."""

    def __init__(self):
        self.model = small_model()
        self.gsm = GradSampleModuleFastGradientClipping(self.model, loss_reduction="sum")
        # lr 0: the model stays put, so removing a sample changes nothing but its own term.
        inner = torch.optim.SGD(self.gsm.parameters(), lr=0.0)
        self.released = []
        inner.register_step_pre_hook(
            lambda *_: self.released.append(
                torch.cat([p.grad.detach().reshape(-1) for p in self.model.parameters()])
            )
        )
        self.optimizer = DPOptimizerFastGradientClipping(
            inner,
            noise_multiplier=0.0,
            max_grad_norm=C,
            expected_batch_size=4,
            loss_reduction="sum",
        )
        self.accounted = []
        self.optimizer.attach_step_hook(lambda opt: self.accounted.append(1))
        self.criterion = DPLossFastGradientClipping(
            self.gsm, self.optimizer, nn.CrossEntropyLoss(), "sum"
        )

    def backward(self, x, y):
        self.criterion(self.gsm(x), y).backward()

    def params(self):
        return [p.detach().clone() for p in self.model.parameters()]


# ------------------------------------------------------------------ misuse is refused
def test_two_steps_after_one_backward():
    run = _Run()
    x, y = _data()
    run.backward(x[:4], y[:4])
    run.optimizer.step()
    before = run.params()
    with pytest.raises(ValueError, match="already used by an earlier optimizer step"):
        run.optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, run.params()))
    assert len(run.released) == 1 and len(run.accounted) == 1


@pytest.mark.parametrize("set_to_none", [True, False])
def test_model_zero_grad_instead_of_optimizer_zero_grad(set_to_none):
    run = _Run()
    x, y = _data()
    run.backward(x[:4], y[:4])
    run.optimizer.step()
    run.model.zero_grad(set_to_none=set_to_none)  # leaves the released summed_grad behind
    run.backward(x[4:], y[4:])
    before = run.params()
    with pytest.raises(ValueError, match="optimizer.zero_grad"):
        run.optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, run.params()))
    assert len(run.released) == 1 and len(run.accounted) == 1


def test_forgotten_zero_grad():
    run = _Run()
    x, y = _data()
    run.backward(x[:4], y[:4])
    run.optimizer.step()
    run.backward(x[4:], y[4:])  # adds into the released p.grad
    with pytest.raises(ValueError, match="already used"):
        run.optimizer.step()
    assert len(run.released) == 1


def test_forgotten_zero_grad_between_virtual_steps():
    run = _Run()
    x, y = _data()
    run.optimizer.signal_skip_step(True)
    run.backward(x[:4], y[:4])
    run.optimizer.step()  # virtual: the clipped p.grad is now in summed_grad
    run.backward(x[4:], y[4:])  # without zero_grad it adds into that consumed p.grad
    with pytest.raises(ValueError, match="already used"):
        run.optimizer.step()
    assert run.released == []


# ------------------------------------------------------------------ correct loops: bound holds
def _plain_loop(run, batches, zero_grad):
    for x, y in batches:
        zero_grad(run)
        run.backward(x, y)
        run.optimizer.step()


def _virtual_loop(run, batches, zero_grad):
    # Two physical batches per logical one (what BatchMemoryManager does).
    for k, (x, y) in enumerate(batches):
        if k % 2 == 0:
            run.optimizer.signal_skip_step(True)
        run.backward(x, y)
        run.optimizer.step()
        zero_grad(run)


_ZERO_GRADS = {
    "optimizer": lambda run: run.optimizer.zero_grad(),
    "optimizer_set_to_none": lambda run: run.optimizer.zero_grad(set_to_none=True),
}


def _batches(x, y, drop=None, size=2):
    keep = [i for i in range(len(x)) if i != drop]
    out = []
    for start in range(0, len(x), size):
        rows = [i for i in range(start, start + size) if i in keep]
        out.append((x[rows], y[rows]))
    return out


@pytest.mark.parametrize("loop", [_plain_loop, _virtual_loop])
@pytest.mark.parametrize("zero_grad", sorted(_ZERO_GRADS))
def test_each_samples_influence_on_the_released_updates_is_at_most_C(loop, zero_grad):
    x, y = _data()
    full = _Run()
    loop(full, _batches(x, y), _ZERO_GRADS[zero_grad])
    assert len(full.released) == (4 if loop is _plain_loop else 2)
    for k in range(len(x)):
        without = _Run()
        loop(without, _batches(x, y, drop=k), _ZERO_GRADS[zero_grad])
        # Same model and order: only sample k's clipped gradient may differ, in one update.
        influence = sum((a - b).norm().item() for a, b in zip(full.released, without.released))
        assert influence <= C * (1 + 1e-6), (k, influence)
        assert influence > 0.5 * C  # non-vacuous: each sample here is clipped to norm C


@pytest.mark.parametrize("set_to_none", [True, False])
def test_model_zero_grad_after_a_virtual_step_is_fine(set_to_none):
    """Between virtual steps nothing was released yet: ``model.zero_grad()`` may clear p.grad
    (even in place) and the logical batch is released once, as with optimizer.zero_grad()."""
    x, y = _data()
    runs = []
    for use_model in (True, False):
        run = _Run()
        for k, (xb, yb) in enumerate(_batches(x, y)):
            virtual = k % 2 == 0
            if virtual:
                run.optimizer.signal_skip_step(True)
            run.backward(xb, yb)
            run.optimizer.step()
            if virtual and use_model:
                run.model.zero_grad(set_to_none=set_to_none)
            else:
                run.optimizer.zero_grad()
        runs.append(run)
    assert len(runs[0].released) == 2
    for a, b in zip(runs[0].released, runs[1].released):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ accumulation (cluster 11)
def _make_private(poisson_sampling):
    from torch.utils.data import DataLoader, TensorDataset

    from opacus import PrivacyEngine

    model = small_model()
    x, y = _data(12)
    engine = PrivacyEngine(accountant="rdp")
    gsm, optimizer, criterion, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
        noise_multiplier=0.0,
        max_grad_norm=C,
        grad_sample_mode="ghost",
        poisson_sampling=poisson_sampling,
    )
    return engine, gsm, optimizer, criterion, x, y


def test_two_dp_backward_passes_before_one_step_count_as_two_batches():
    from tests.optimizers.dp_reference import clipped_sum_flat, oracle_grad_samples

    engine, gsm, optimizer, criterion, x, y = _make_private(poisson_sampling=False)
    criterion(gsm(x[:4]), y[:4]).backward()
    criterion(gsm(x[4:8]), y[4:8]).backward()
    optimizer.step()
    assert optimizer.accumulated_iterations == 2
    gs = oracle_grad_samples(small_model(), x[:8], y[:8])
    expected = clipped_sum_flat([gs[n] for n, _ in small_model().named_parameters()], C)
    for p, s in zip(gsm.parameters(), expected):
        torch.testing.assert_close(p.grad, s / (4 * 2))  # expected batch size 4, two batches
    [(_, sample_rate, steps)] = engine.accountant.history
    assert sample_rate == pytest.approx(2 * 4 / 12) and steps == 1


def test_with_poisson_sampling_a_second_dp_backward_before_the_step_is_refused():
    engine, gsm, optimizer, criterion, x, y = _make_private(poisson_sampling=True)
    criterion(gsm(x[:4]), y[:4]).backward()
    first = [p.grad.clone() for p in gsm.parameters()]
    loss = criterion(gsm(x[4:8]), y[4:8])
    with pytest.raises(ValueError, match="accumulation is forbidden"):
        loss.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(first, gsm.parameters()))
    optimizer.step()  # the first batch alone is released, once
    assert optimizer.accumulated_iterations == 1
    assert len(engine.accountant.history) == 1

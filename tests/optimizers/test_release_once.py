"""Release once: no batch enters two released updates, whatever the training loop gets wrong.

Each misuse of issue 16 (a second ``step()`` after one backward, a forgotten
``optimizer.zero_grad()``, ``model.zero_grad()`` instead of it, in plain loops and inside
``BatchMemoryManager``) is replayed on a GradSampleModule (hooks and functorch modes) and checked
with a brute-force bound: every sample's total influence on the released updates is at most the
clip bound C, and the misuse is refused with a clear ``ValueError`` where it happens.

The influence is measured by leave-one-out over the whole run.  The model is linear in its
parameters with a loss whose per-sample gradient does not depend on them (``w . x_i``), so a
sample's contribution to every step is the same whatever the trajectory: replaying the run with
``x_j = 0`` (sample j contributes nothing) and adding up ``||update_t(D) - update_t(D - j)||``
over the steps gives exactly how much of sample j was released.  DP-SGD allows C (one release of
one clipped gradient); a re-released batch shows up as 2C.
"""

from typing import Callable, List, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from opacus.grad_sample import GradSampleModule
from opacus.optimizers import AdaClipDPOptimizer, DPOptimizer, DPPerLayerOptimizer
from opacus.optimizers.consumed import is_consumed
from opacus.utils.batch_memory_manager import BatchMemoryManager
from tests.optimizers.dp_reference import small_model

N = 8  # samples; sample i lives in input coordinate i
C = 1.0
MODES = ["hooks", "functorch"]


def _data(drop: Optional[int] = None) -> torch.Tensor:
    x = 10.0 * torch.eye(N, dtype=torch.float64)  # per-sample gradient norm 10 > C: clipped
    if drop is not None:
        x[drop] = 0.0
    return x


def _setup(mode: str, optimizer_cls=DPOptimizer, **kw):
    torch.manual_seed(0)
    model = nn.Linear(N, 1, bias=False).double()
    gsm = GradSampleModule(model, loss_reduction="sum", force_functorch=(mode == "functorch"))
    args = dict(noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=4)
    args.update(kw)
    if optimizer_cls is DPPerLayerOptimizer:
        args["max_grad_norm"] = [C]
    opt = optimizer_cls(torch.optim.SGD(gsm.parameters(), lr=1.0), loss_reduction="sum", **args)
    return gsm, opt


class Run:
    """One training run: records every released update and every refused step."""

    def __init__(self, mode: str, x: torch.Tensor, optimizer_cls=DPOptimizer, **kw):
        self.gsm, self.opt = _setup(mode, optimizer_cls, **kw)
        self.x = x
        self.updates: List[torch.Tensor] = []
        self.refused: List[str] = []

    def backward(self, rows: slice) -> None:
        self.gsm(self.x[rows]).sum().backward()

    def step(self) -> None:
        before = self.gsm._module.weight.detach().clone()
        try:
            self.opt.step()
        except ValueError as err:
            self.refused.append(str(err))
            return
        delta = self.gsm._module.weight.detach() - before
        if delta.abs().sum() > 0:
            self.updates.append(delta)


def influences(scenario: Callable[[Run], None], mode: str, **kw) -> List[float]:
    """Leave-one-out influence of every sample on the released updates (module docstring)."""
    full = Run(mode, _data(), **kw)
    scenario(full)
    out = []
    for j in range(N):
        loo = Run(mode, _data(drop=j), **kw)
        scenario(loo)
        assert len(loo.updates) == len(full.updates) and loo.refused == full.refused
        out.append(sum((u - v).norm().item() for u, v in zip(full.updates, loo.updates)))
    return out, full


def assert_bounded(infl: List[float], released: List[int]) -> None:
    """Every sample at most C; the samples of released batches exactly C (the measure works)."""
    assert max(infl) <= C * (1 + 1e-9), infl
    for j, value in enumerate(infl):
        if j in released:
            assert value == pytest.approx(C, rel=1e-5), (j, value)
        else:
            assert value == 0.0, (j, value)


# ------------------------------------------------------------------ correct loops (controls)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("set_to_none", [False, True])
def test_correct_loop_releases_each_sample_once(mode, set_to_none):
    def scenario(r: Run):
        for rows in (slice(0, 4), slice(4, 8)):
            r.opt.zero_grad(set_to_none=set_to_none)
            r.backward(rows)
            r.step()

    infl, run = influences(scenario, mode)
    assert run.refused == [] and len(run.updates) == 2
    assert_bounded(infl, released=range(N))


# ------------------------------------------------------------------ misuse
def _refused_with_zero_grad_advice(run: Run, count: int = 1) -> None:
    assert len(run.refused) == count
    for message in run.refused:
        assert "already used by an earlier optimizer step" in message
        assert "optimizer.zero_grad()" in message


@pytest.mark.parametrize("mode", MODES)
def test_step_twice_after_one_backward_is_refused(mode):
    def scenario(r: Run):
        r.opt.zero_grad()
        r.backward(slice(0, 4))
        r.step()
        r.step()  # the same per-sample gradients (and the released sum) again
        r.opt.zero_grad()
        r.backward(slice(4, 8))
        r.step()

    infl, run = influences(scenario, mode)
    assert_bounded(infl, released=range(N))
    _refused_with_zero_grad_advice(run)


@pytest.mark.parametrize("mode", MODES)
def test_forgotten_optimizer_zero_grad_is_refused(mode):
    def scenario(r: Run):
        r.opt.zero_grad()
        r.backward(slice(0, 4))
        r.step()
        r.backward(slice(4, 8))  # no zero_grad: grad_sample holds the consumed batch + this one
        assert isinstance(r.gsm._module.weight.grad_sample, list)
        r.step()
        r.opt.zero_grad()  # recovering: the next batch is released on its own
        r.backward(slice(4, 8))
        r.step()

    infl, run = influences(scenario, mode)
    assert_bounded(infl, released=range(N))
    _refused_with_zero_grad_advice(run)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["GradSampleModule", "nn.Module"])
def test_model_zero_grad_instead_of_optimizer_zero_grad_is_refused(mode, which):
    def scenario(r: Run):
        zero_grad = r.gsm.zero_grad if which == "GradSampleModule" else r.gsm._module.zero_grad
        r.opt.zero_grad()
        r.backward(slice(0, 4))
        r.step()
        zero_grad()  # leaves the released summed_grad (and, for nn.Module, grad_sample) behind
        r.backward(slice(4, 8))
        r.step()

    infl, run = influences(scenario, mode)
    assert_bounded(infl, released=range(4))
    _refused_with_zero_grad_advice(run)


def _bmm_loop(r: Run, zero_grad: Optional[Callable[[], None]]) -> None:
    loader = DataLoader(TensorDataset(r.x), batch_size=4)  # two logical batches
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=r.opt) as dl:
        for (xb,) in dl:
            if zero_grad is not None:
                zero_grad()
            r.gsm(xb).sum().backward()
            r.step()


@pytest.mark.parametrize("mode", MODES)
def test_batch_memory_manager_correct_loop(mode):
    infl, run = influences(lambda r: _bmm_loop(r, r.opt.zero_grad), mode)
    assert run.refused == [] and len(run.updates) == 2
    assert_bounded(infl, released=range(N))


@pytest.mark.parametrize("mode", MODES)
def test_batch_memory_manager_forgotten_zero_grad_is_refused(mode):
    """Skipped (virtual) steps mark their chunks too: the next physical step refuses them."""
    infl, run = influences(lambda r: _bmm_loop(r, None), mode)
    assert_bounded(infl, released=[])
    assert len(run.refused) >= 1 and run.refused[0].count("already used") == 1


@pytest.mark.parametrize("mode", MODES)
def test_batch_memory_manager_with_model_zero_grad_is_refused_at_the_next_logical_batch(mode):
    """GradSampleModule.zero_grad clears grad_sample, so the physical steps of one logical batch
    accumulate correctly; the next logical batch must not add into the released sum."""
    infl, run = influences(lambda r: _bmm_loop(r, r.gsm.zero_grad), mode)
    assert_bounded(infl, released=range(4))
    assert len(run.updates) == 1 and len(run.refused) >= 1


@pytest.mark.parametrize("optimizer_cls", [DPPerLayerOptimizer, AdaClipDPOptimizer])
def test_other_optimizers_refuse_the_same_misuse(optimizer_cls):
    kw = {}
    if optimizer_cls is AdaClipDPOptimizer:
        kw = dict(
            target_unclipped_quantile=0.5,
            clipbound_learning_rate=0.0,
            max_clipbound=10.0,
            min_clipbound=0.1,
            unclipped_num_std=1.0,
        )

    def scenario(r: Run):
        r.opt.zero_grad()
        r.backward(slice(0, 4))
        r.step()
        r.step()
        r.backward(slice(4, 8))
        r.step()
        r.gsm.zero_grad()
        r.backward(slice(4, 8))
        r.step()

    infl, run = influences(scenario, "hooks", optimizer_cls=optimizer_cls, **kw)
    assert_bounded(infl, released=range(4))
    _refused_with_zero_grad_advice(run, count=3)


def test_zero_grad_clears_per_sample_state_and_keeps_a_skipped_sum():
    gsm, opt = _setup("hooks")
    x = _data()
    gsm(x[:4]).sum().backward()
    opt.signal_skip_step(True)
    opt.step()
    (p,) = opt.params
    assert is_consumed(p.grad_sample) and not is_consumed(p.summed_grad)
    opt.zero_grad(set_to_none=True)
    assert p.grad_sample is None and p.grad is None and p.summed_grad is not None
    gsm(x[4:]).sum().backward()
    opt.step()
    assert is_consumed(p.summed_grad)
    opt.zero_grad(set_to_none=False)
    assert p.grad_sample is None and p.summed_grad is None
    assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


# ------------------------------------------------------------------ correct accumulation
@pytest.mark.parametrize("mode", MODES)
def test_accumulation_over_eight_backward_passes_is_one_step_over_all_samples(mode):
    """Contract, gradient accumulation: 8 passes of 16 samples, then one step (noise 0, no
    effective clipping) give accumulated_iterations == 8, 128 rows per parameter, and p.grad is
    the gradient of the mean loss over all 128 samples (torch autograd on a plain copy)."""
    model = small_model()
    reference = small_model()
    gsm = GradSampleModule(model, force_functorch=(mode == "functorch"))
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=999.0,
        expected_batch_size=16,
    )
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (128,), generator=g)
    opt.zero_grad()
    for k in range(8):
        rows = slice(16 * k, 16 * k + 16)
        F.cross_entropy(gsm(x[rows]), y[rows]).backward()
    assert opt.accumulated_iterations == 8
    for p in opt.params:
        assert isinstance(p.grad_sample, list) and [c.shape[0] for c in p.grad_sample] == [16] * 8
    assert all(gs.shape[0] == 128 for gs in opt.grad_samples)
    assert opt.pre_step()
    F.cross_entropy(reference(x), y).backward()
    for p, q in zip(opt.params, reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-10)


def test_accumulated_iterations_errors():
    gsm, opt = _setup("hooks")
    (p,) = opt.params
    p.grad_sample = [torch.zeros(2, 1, N, dtype=torch.float64)] * 3
    assert opt.accumulated_iterations == 3
    q = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt.original_optimizer.add_param_group({"params": [q]})
    with pytest.raises(ValueError, match="are you using GradSampleModule"):
        opt.accumulated_iterations
    q.grad_sample = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"different numbers .*\[1, 3\]"):
        opt.accumulated_iterations


# ------------------------------------------------------------------ eval mode
@pytest.mark.parametrize("mode", MODES)
def test_step_after_model_eval_says_model_train(mode):
    gsm, opt = _setup(mode)
    gsm.eval()
    gsm(_data()[:4]).sum().backward()
    with pytest.raises(ValueError, match=r"model\.train\(\)"):
        opt.step()
    opt.zero_grad()  # grad_sample is now None, p.grad still set by the next backward
    gsm(_data()[:4]).sum().backward()
    with pytest.raises(ValueError, match=r"eval mode.*model\.train\(\)"):
        opt.step()

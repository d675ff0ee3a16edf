"""The lighter optimizer step (issue 18): noise and scaling fused into one pass, and a real
ghost step taking the clipped sum without copying it, are the same step as the stages run one
after the other (reference: subclasses that force the separate stages): bit for bit when the
scaling denominator is a power of two, within rounding (about an ulp) otherwise, since the fused
pass draws ``N(0, (std / d)^2)`` and adds ``summed_grad / d``."""

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.consumed import is_consumed
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping


class _SeparateStages(DPOptimizer):
    """``scale_grad`` overridden (by itself): the stages run one after the other."""

    def scale_grad(self):
        super().scale_grad()


class _SeparateGhostStages(DPOptimizerFastGradientClipping):
    """Overrides ``accumulate`` and ``scale_grad``: the copying accumulate and separate stages."""

    def accumulate(self):
        super().accumulate()

    def scale_grad(self):
        super().scale_grad()


def _params(seed=0):
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(*s)) for s in [(7, 5), (7,), (3, 7), (1,)]]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_fused_noise_and_scale_is_bit_identical_to_the_separate_stages(reduction, sigma):
    results = []
    for cls in (DPOptimizer, _SeparateStages):
        params = _params()
        opt = cls(
            torch.optim.SGD(params, lr=0.1),
            noise_multiplier=sigma,
            max_grad_norm=0.7,
            expected_batch_size=4,
            loss_reduction=reduction,
            generator=torch.Generator().manual_seed(5),
        )
        for step in range(3):
            for i, p in enumerate(params):
                g = torch.Generator().manual_seed(10 * step + i)
                p.grad_sample = torch.randn(4, *p.shape, generator=g)
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in params])
    for fused, separate in zip(*results):
        assert torch.equal(fused, separate)


def test_a_subclass_stage_runs_instead_of_the_fused_pass():
    calls = []

    class Recording(DPOptimizer):
        def add_noise(self):
            calls.append("add_noise")
            super().add_noise()

        def scale_grad(self):
            calls.append("scale_grad")
            super().scale_grad()

    params = _params()
    opt = Recording(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )
    for p in params:
        p.grad_sample = torch.randn(4, *p.shape)
    opt.step()
    assert calls == ["add_noise", "scale_grad"]


def _same(fast, reference, exact):
    if exact:
        assert torch.equal(fast, reference)
    else:
        torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-7)


def _ghost(cls, reduction="mean", sigma=0.8, batch=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction=reduction)
    opt = cls(
        torch.optim.SGD(gsm.parameters(), lr=0.05),
        noise_multiplier=sigma,
        max_grad_norm=0.5,
        expected_batch_size=batch,
        loss_reduction=reduction,
        generator=torch.Generator().manual_seed(3),
    )
    crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), reduction)
    return model, gsm, opt, crit


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)
    ]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("batch", [4, 6])
def test_ghost_steps_without_the_copy_match_the_separate_stages(reduction, set_to_none, batch):
    """Real and virtual steps (signal_skip_step), zero_grad with and without set_to_none;
    denominators 4 and 8 (bit for bit), 6 and 12 (within rounding)."""
    results = []
    for cls in (DPOptimizerFastGradientClipping, _SeparateGhostStages):
        model, gsm, opt, crit = _ghost(cls, reduction, batch=batch)
        for i, (x, y) in enumerate(_batches(6)):
            crit(gsm(x), y).backward()
            if i % 3 == 0:
                opt.signal_skip_step(True)  # a virtual step: the sum carries over
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
        results.append([p.detach().clone() for p in model.parameters()])
    for fast, reference in zip(*results):
        _same(fast, reference, exact=reduction == "sum" or batch == 4)


def test_a_virtual_step_keeps_its_own_copy_of_the_clipped_sum():
    """A virtual step's p.grad stays (consumed) and zero_grad(set_to_none=False) zeroes it in
    place: the sum kept for the next real step must not share its memory."""
    model, gsm, opt, crit = _ghost(DPOptimizerFastGradientClipping, "sum", sigma=0.0)
    (x, y), (x2, y2) = _batches(2)
    crit(gsm(x), y).backward()
    first = {p: p.grad.clone() for p in model.parameters()}
    opt.signal_skip_step(True)
    opt.step()
    opt.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert torch.equal(p.summed_grad, first[p])
        assert p.summed_grad.untyped_storage().data_ptr() != p.grad.untyped_storage().data_ptr()
    crit(gsm(x2), y2).backward()
    second = {p: p.grad.clone() for p in model.parameters()}
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, b in zip(model.parameters(), before):
        # sigma 0, "sum": the released update is the sum of both batches' clipped sums.
        torch.testing.assert_close(p.detach(), b - 0.05 * (first[p] + second[p]))


def test_a_real_ghost_step_marks_what_it_released_and_refuses_a_second_step():
    model, gsm, opt, crit = _ghost(DPOptimizerFastGradientClipping)
    ((x, y),) = _batches(1)
    crit(gsm(x), y).backward()
    clipped = [p.grad for p in model.parameters()]
    opt.step()
    for p, c in zip(model.parameters(), clipped):
        assert is_consumed(c) and is_consumed(p.grad) and is_consumed(p.summed_grad)
        assert p.grad is not c  # the released gradient is the fresh noisy tensor
    with pytest.raises(ValueError, match="already used by an earlier optimizer step"):
        opt.step()


@pytest.mark.parametrize("divisor", [1.0, 8.0, 12.0, 0.3])
@pytest.mark.parametrize("one_call", [False, True])
def test_the_divisor_scales_the_same_draws(divisor, one_call):
    """``with_gaussian_noise(divisor=d)`` is ``(t + N(0, std^2)) / d`` from the same draws."""
    from opacus.optimizers.noise import with_gaussian_noise

    tensors = [torch.randn(300, 7), torch.randn(5)]
    kw = dict(one_call_per_device=one_call)
    plain = dict(
        with_gaussian_noise(1.7, tensors, generator=torch.Generator().manual_seed(4), **kw)
    )
    fused = dict(
        with_gaussian_noise(
            1.7, tensors, generator=torch.Generator().manual_seed(4), divisor=divisor, **kw
        )
    )
    for i in plain:
        torch.testing.assert_close(fused[i], plain[i] / divisor, rtol=1e-6, atol=1e-6 / divisor)
        if divisor in (1.0, 8.0):
            assert torch.equal(fused[i], plain[i] / divisor)
        assert not torch.equal(fused[i], tensors[i] / divisor)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("inf"), float("nan")])
def test_a_bad_divisor_is_refused(bad):
    from opacus.optimizers.noise import with_gaussian_noise

    with pytest.raises(ValueError, match="divisor"):
        list(with_gaussian_noise(1.0, [torch.zeros(3)], divisor=bad))


def test_secure_mode_and_zero_noise_divide_after_the_draw():
    from opacus.optimizers.noise import with_gaussian_noise

    t = torch.randn(10)
    ((_, zero),) = with_gaussian_noise(0.0, [t], divisor=4.0)
    assert torch.equal(zero, t / 4)
    ((_, secure),) = with_gaussian_noise(1e-3, [t], divisor=4.0, secure_mode=True)
    torch.testing.assert_close(secure, t / 4, atol=0.01, rtol=0)
    assert not torch.equal(secure, t / 4)

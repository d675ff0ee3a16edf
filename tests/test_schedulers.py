"""Noise and clip-bound schedulers against closed forms."""

import pickle

import pytest
import torch

from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
from opacus.schedulers import (
    ExponentialGradClip,
    ExponentialNoise,
    LambdaGradClip,
    LambdaNoise,
    StepGradClip,
    StepNoise,
)


def _dp(noise_multiplier=2.0, max_grad_norm=3.0):
    p = torch.nn.Parameter(torch.zeros(2))
    return DPOptimizer(
        torch.optim.SGD([p], lr=0.1),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=4,
    )


CASES = [
    (ExponentialNoise, dict(gamma=0.9), "noise_multiplier", lambda v0, k: v0 * 0.9**k),
    (
        StepNoise,
        dict(step_size=3, gamma=0.5),
        "noise_multiplier",
        lambda v0, k: v0 * 0.5 ** (k // 3),
    ),
    (
        LambdaNoise,
        dict(noise_lambda=lambda k: 1 / (1 + k)),
        "noise_multiplier",
        lambda v0, k: v0 / (1 + k),
    ),
    (ExponentialGradClip, dict(gamma=1.1), "max_grad_norm", lambda v0, k: v0 * 1.1**k),
    (
        StepGradClip,
        dict(step_size=2, gamma=0.1),
        "max_grad_norm",
        lambda v0, k: v0 * 0.1 ** (k // 2),
    ),
    (
        LambdaGradClip,
        dict(scheduler_function=lambda k: 2.0**-k),
        "max_grad_norm",
        lambda v0, k: v0 * 2.0**-k,
    ),
]


@pytest.mark.parametrize("cls, kw, attr, closed_form", CASES)
def test_matches_closed_form(cls, kw, attr, closed_form):
    opt = _dp()
    v0 = getattr(opt, attr)
    sched = cls(opt, **kw)
    for k in range(8):
        assert getattr(opt, attr) == pytest.approx(closed_form(v0, k)), k
        assert sched.last_epoch == k
        sched.step()


@pytest.mark.parametrize("cls, kw, attr, closed_form", CASES)
def test_state_dict_round_trip(cls, kw, attr, closed_form):
    opt = _dp()
    v0 = getattr(opt, attr)
    sched = cls(opt, **kw)
    for _ in range(4):
        sched.step()
    sd = pickle.loads(pickle.dumps(sched.state_dict()))  # picklable: no optimizer, no lambda
    assert "optimizer" not in sd

    opt2 = _dp()
    sched2 = cls(opt2, **kw)
    sched2.load_state_dict(sd)
    setattr(opt2, attr, getattr(opt, attr))  # the optimizer's own state dict restores this
    for k in range(5, 8):
        sched.step()
        sched2.step()
        assert getattr(opt2, attr) == pytest.approx(getattr(opt, attr))
        assert getattr(opt2, attr) == pytest.approx(closed_form(v0, k))


def test_grad_clip_schedule_rescales_per_layer_bounds():
    ps = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    opt = DPPerLayerOptimizer(
        torch.optim.SGD(ps, lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=[3.0, 4.0],
        expected_batch_size=2,
    )
    sched = StepGradClip(opt, step_size=1, gamma=0.5)
    sched.step()
    assert opt.max_grad_norm == pytest.approx(2.5)
    assert opt.max_grad_norms == pytest.approx([1.5, 2.0])


def test_scheduled_value_is_used_by_the_step():
    p = torch.nn.Parameter(torch.zeros(20000))
    opt = DPOptimizer(
        torch.optim.SGD([p], lr=0.1),
        noise_multiplier=4.0,
        max_grad_norm=1.0,
        expected_batch_size=1,
        generator=torch.Generator().manual_seed(0),
    )
    sched = ExponentialNoise(opt, gamma=0.25)
    sched.step()  # sigma = 1
    p.grad_sample = torch.zeros(1, 20000)
    opt.pre_step()
    assert abs(p.grad.std().item() - 1.0) < 0.05


def test_errors():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match="DPOptimizer"):
        ExponentialNoise(sgd, gamma=0.5)
    with pytest.raises(TypeError, match="DPOptimizer"):
        ExponentialGradClip(sgd, gamma=0.5)
    with pytest.raises(ValueError, match="step_size"):
        StepNoise(_dp(), step_size=0, gamma=0.5)

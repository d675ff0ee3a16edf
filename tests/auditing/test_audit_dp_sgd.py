"""End-to-end: the audit as an oracle for PrivacyEngine's DP-SGD.

A correct engine must give eps_lower <= eps_claimed; deliberately broken optimizers (clipping off,
noise 10x too small, per-sample gradients of neighbouring samples mixed) must give
eps_lower > eps_claimed. Broken variants are made by swapping the class of the optimizer that the
real ``make_private`` returns for a subclass with one stage sabotaged.

Configurations (measured, 2 CPU cores): "tiny" = 64 samples, sigma = 2, full batch (q = 1), one
step, delta = 1e-5, eps_claimed ~ 2. The mixing bug doubles the sensitivity, which no affordable
audit sees at delta = 1e-5 (the claim there is about tails beyond ~1/trials); it is audited at
delta = 1e-2, where sigma = 1 claims eps ~ 2.3 and the doubled sensitivity is measurable.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from opacus.auditing import (
    audit_dp_sgd,
    audit_dp_sgd_input_canary,
    audit_dp_sgd_one_run,
    run_canary_experiment,
)
from tests.auditing.sabotage import (
    MixedSamples,
    NoClipping,
    QuietNoise,
    SwappedSamples,
    engine_with,
)


def tiny_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)


def linear():
    return nn.Linear(4, 2)


TINY = dict(noise_multiplier=2.0, max_grad_norm=1.0)


def test_scores_have_the_closed_form_distribution():
    # Correct DP-SGD, q = 1, one step, lr = 1, mean reduction over B = 64: the canary coordinate
    # moves by (C * clip + N(0, (sigma C)^2)) / B with the canary, by the noise alone without.
    included = np.zeros((4, 500), dtype=bool)
    included[:, ::2] = True
    scores, eps = run_canary_experiment(linear, tiny_data(), TINY, included)
    b, sigma = 64, 2.0
    z_in = (scores[included] * b - 1.0) / sigma
    z_out = scores[~included] * b / sigma
    assert stats.kstest(z_in, "norm").pvalue > 1e-3
    assert stats.kstest(z_out, "norm").pvalue > 1e-3
    assert 1.5 < eps < 2.5


def test_correct_engine_passes_tiny():
    res = audit_dp_sgd(linear, tiny_data(), TINY, trials=2000, canaries_per_run=100)
    assert res.eps_lower <= res.eps_claimed
    assert res.trials == 2000 and res.runs == 20 and not res.violation


@pytest.mark.parametrize("sabotage", [NoClipping, QuietNoise, SwappedSamples])
def test_broken_engine_is_caught_tiny(sabotage):
    res = audit_dp_sgd(
        linear,
        tiny_data(),
        TINY,
        trials=2000,
        canaries_per_run=100,
        privacy_engine_factory=engine_with(sabotage),
    )
    assert res.violation == (sabotage is not SwappedSamples), res.summary()


@pytest.mark.parametrize("sabotage", [None, NoClipping, QuietNoise])
def test_one_run_audit(sabotage):
    res = audit_dp_sgd_one_run(
        linear, tiny_data(), TINY, num_canaries=1000, privacy_engine_factory=engine_with(sabotage)
    )
    assert res.runs == 1 and res.detail.num_guesses == 200
    assert res.violation == (sabotage is not None), res.summary()


@pytest.mark.parametrize("sabotage", [None, MixedSamples])
def test_mixed_per_sample_gradients(sabotage):
    res = audit_dp_sgd(
        linear,
        tiny_data(1024),
        dict(noise_multiplier=1.0, max_grad_norm=1.0),
        delta=1e-2,
        trials=4000,
        canaries_per_run=100,
        privacy_engine_factory=engine_with(sabotage),
    )
    assert res.violation == (sabotage is not None), res.summary()


def test_subsampled_multi_step_correct_engine_passes():
    # q = 1/4, 8 steps: the canary is Poisson-sampled like any member, so amplification applies.
    res = audit_dp_sgd(
        linear,
        tiny_data(),
        dict(noise_multiplier=1.0, max_grad_norm=1.0),
        trials=2000,
        canaries_per_run=100,
        batch_size=16,
        steps=8,
    )
    assert 0 <= res.eps_lower <= res.eps_claimed


@pytest.mark.slow
@pytest.mark.parametrize("sabotage", [None, QuietNoise])
def test_textbook_one_canary_per_run(sabotage):
    # canaries_per_run=1: every trial is its own training run, no independence assumption.
    res = audit_dp_sgd(
        linear,
        tiny_data(),
        TINY,
        trials=300,
        privacy_engine_factory=engine_with(sabotage),
        threshold_method="bonferroni",
    )
    assert res.runs == 300
    assert res.violation == (sabotage is not None), res.summary()


def test_bad_arguments():
    with pytest.raises(ValueError, match="noise_multiplier"):
        audit_dp_sgd(linear, tiny_data(), dict(max_grad_norm=1.0))
    with pytest.raises(ValueError, match="scalar max_grad_norm"):
        audit_dp_sgd(linear, tiny_data(), dict(noise_multiplier=1.0, max_grad_norm=[1.0, 1.0]))
    with pytest.raises(ValueError, match="ghost"):
        audit_dp_sgd(linear, tiny_data(), dict(TINY, grad_sample_mode="ghost"))
    with pytest.raises(ValueError, match="do not pass 'module'"):
        audit_dp_sgd(linear, tiny_data(), dict(TINY, module=linear()))
    with pytest.raises(TypeError, match="Dataset or a tuple of tensors"):
        audit_dp_sgd(linear, [[1, 2]], TINY)
    with pytest.raises(ValueError, match="trials >= 4"):
        audit_dp_sgd(linear, tiny_data(), TINY, trials=2)
    assert math.isfinite(
        audit_dp_sgd(linear, tiny_data(), TINY, trials=8, canaries_per_run=4).eps_claimed
    )


# ---------------------------------------------------------------- input canaries
class AllSamplesLinear(nn.Linear):
    """A Linear whose (sabotaged) grad sampler puts the whole batch's gradient in every row, as
    when a layer given seq-first activations treats positions as samples."""


@pytest.fixture(scope="module")
def all_samples_sampler():
    from opacus.grad_sample.registry import GRAD_SAMPLERS

    def mixed(layer, activations, backprops):
        grads = GRAD_SAMPLERS[nn.Linear](layer, activations, backprops)
        return {p: g.sum(0, keepdim=True).expand_as(g).clone() for p, g in grads.items()}

    GRAD_SAMPLERS[AllSamplesLinear] = mixed
    yield
    del GRAD_SAMPLERS[AllSamplesLinear]


def input_canary_setup(cls):
    # Feature 4 is never used by the data; the canary puts 100 there with the label the initial
    # model finds least likely, so its gradient is large (and clipped).
    x, y = tiny_data()
    x = torch.cat([x, torch.zeros(len(x), 1)], dim=1)
    xc = torch.tensor([0.0, 0.0, 0.0, 0.0, 100.0])
    torch.manual_seed(0)
    yc = cls(5, 2)(xc).argmin()
    return (x, y), (xc, yc)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [nn.Linear, AllSamplesLinear])
def test_input_canary_audit_covers_grad_samplers(cls, all_samples_sampler):
    data, canary = input_canary_setup(cls)
    res = audit_dp_sgd_input_canary(lambda: cls(5, 2), data, canary, TINY, trials=300)
    assert res.runs == 300 and res.method == "input-canary-split"
    assert res.violation == (cls is AllSamplesLinear), res.summary()


def test_input_canary_with_vanishing_gradient_is_refused():
    data, _ = input_canary_setup(nn.Linear)
    with pytest.raises(ValueError, match="gradient at the initial model is zero"):
        audit_dp_sgd_input_canary(
            lambda: nn.Linear(5, 2),
            data,
            (torch.zeros(5), torch.tensor(0)),
            dict(TINY),
            criterion=lambda out, t: (out * 0).sum(),
            trials=4,
        )

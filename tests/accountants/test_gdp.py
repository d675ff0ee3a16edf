"""GDP analysis and accountant against closed forms, direct integration and the PRV accountant."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from opacus.accountants import GaussianAccountant, PRVAccountant
from opacus.accountants.analysis import gdp


def delta_by_integration(eps, mu):
    """delta(eps) = E_{x ~ N(mu, 1)}[(1 - e^{eps - L(x)})_+], L(x) = mu x - mu^2 / 2."""

    def integrand(x):
        return max(0.0, 1.0 - math.exp(eps - (mu * x - mu * mu / 2))) * stats.norm.pdf(x, mu)

    threshold = (eps + mu * mu / 2) / mu
    value, _ = integrate.quad(
        integrand, threshold, threshold + 40, limit=200, epsabs=0.0, epsrel=1e-12
    )
    return value


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0, 10.0])
@pytest.mark.parametrize("q", [1e-4, 1e-2, 0.1, 1.0])
@pytest.mark.parametrize("steps", [1, 100, 10_000, 100_000])
def test_mu_closed_forms(sigma, q, steps):
    mu = gdp.compute_mu_poisson(steps=steps, noise_multiplier=sigma, sample_rate=q)
    assert mu == pytest.approx(q * math.sqrt(steps * (math.exp(sigma**-2) - 1)), rel=1e-12)
    mu_u = gdp.compute_mu_uniform(steps=steps, noise_multiplier=sigma, sample_rate=q)
    naive = q * math.sqrt(
        2
        * steps
        * (math.exp(sigma**-2) * stats.norm.cdf(1.5 / sigma) + 3 * stats.norm.cdf(-0.5 / sigma) - 2)
    )
    assert mu_u == pytest.approx(naive, rel=1e-9)


def test_uniform_and_poisson_agree_for_large_noise():
    # Both CLTs reduce to p sqrt(T) / sigma as sigma -> infinity.
    for sigma in [50.0, 1e3, 1e5]:
        kw = dict(steps=1000, noise_multiplier=sigma, sample_rate=0.01)
        ref = 0.01 * math.sqrt(1000) / sigma
        assert gdp.compute_mu_poisson(**kw) == pytest.approx(ref, rel=1e-3)
        assert gdp.compute_mu_uniform(**kw) == pytest.approx(ref, rel=2e-2)


@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0, 6.0])
def test_delta_eps_mu_matches_integration(mu, eps):
    assert gdp.delta_eps_mu(eps=eps, mu=mu) == pytest.approx(
        delta_by_integration(eps, mu), rel=1e-6, abs=1e-15
    )


@settings(max_examples=30, deadline=None)
@given(mu=st.floats(0.01, 20.0), log_delta=st.floats(-12, -1))
def test_eps_from_mu_inverts_delta(mu, log_delta):
    delta = 10**log_delta
    eps = gdp.eps_from_mu(mu=mu, delta=delta)
    if eps == 0.0:
        assert gdp.delta_eps_mu(eps=0.0, mu=mu) <= delta
    else:
        assert gdp.delta_eps_mu(eps=eps, mu=mu) == pytest.approx(delta, rel=1e-6)
    assert gdp.eps_from_mu(mu=mu * 1.1, delta=delta) >= eps


def test_eps_wrappers_and_errors():
    kw = dict(steps=1000, noise_multiplier=1.1, sample_rate=0.01)
    assert gdp.compute_eps_poisson(delta=1e-5, **kw) == pytest.approx(
        gdp.eps_from_mu(mu=gdp.compute_mu_poisson(**kw), delta=1e-5)
    )
    assert gdp.compute_eps_uniform(delta=1e-5, **kw) == pytest.approx(
        gdp.eps_from_mu(mu=gdp.compute_mu_uniform(**kw), delta=1e-5)
    )
    with pytest.raises(ValueError, match="delta"):
        gdp.eps_from_mu(mu=1.0, delta=0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        gdp.compute_mu_poisson(steps=1, noise_multiplier=0.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        gdp.compute_mu_poisson(steps=1, noise_multiplier=1.0, sample_rate=1.5)
    assert gdp.eps_from_mu(mu=0.0, delta=1e-5) == 0.0


@pytest.mark.parametrize(
    "sigma,q,steps", [(1.0, 1e-3, 100_000), (2.0, 1e-3, 50_000), (0.8, 4e-3, 10_000)]
)
def test_clt_is_close_to_prv_for_small_sample_rates(sigma, q, steps):
    acc = GaussianAccountant()
    acc.history = [(sigma, q, steps)]
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    _, estimate, _ = prv.compute_epsilon(1e-5)
    assert acc.get_epsilon(1e-5) == pytest.approx(estimate, rel=0.08)


def test_gaussian_accountant():
    acc = GaussianAccountant()
    assert acc.get_epsilon(1e-5) == 0.0
    for _ in range(100):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert acc.history == [(1.0, 0.01, 100)] and len(acc) == 100
    kw = dict(steps=100, noise_multiplier=1.0, sample_rate=0.01, delta=1e-5)
    assert acc.get_epsilon(1e-5) == pytest.approx(gdp.compute_eps_poisson(**kw))
    assert acc.get_epsilon(1e-5, poisson=False) == pytest.approx(gdp.compute_eps_uniform(**kw))
    acc.step(noise_multiplier=2.0, sample_rate=0.01)
    with pytest.raises(ValueError, match="single"):
        acc.get_epsilon(1e-5)
    zero = GaussianAccountant()
    zero.step(noise_multiplier=0.0, sample_rate=0.1)
    assert zero.get_epsilon(1e-5) == math.inf
    with pytest.raises(ValueError, match="delta"):
        zero.get_epsilon(0.0)
    assert np.isfinite(GaussianAccountant().get_epsilon(0.5))

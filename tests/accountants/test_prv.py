"""PRV accountant: its pieces against direct integration / brute force, and the whole against
dp_accounting's PLD accountant and the RDP bound."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import (
    DiscretePRV,
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    compute_safe_domain_size,
    discretize,
)
from opacus.accountants.analysis.prv.domain import compute_safe_domain_bounds


def pld_epsilon(events, delta, interval=1e-4):
    acc = PLDAccountant(value_discretization_interval=interval)
    for sigma, q, steps in events:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(event, steps)
    return acc.get_epsilon(delta)


def prv_bounds(events, delta, **kwargs):
    acc = PRVAccountant()
    acc.history = list(events)
    return acc.compute_epsilon(delta, **kwargs)


# ---------------------------------------------------------------- the continuous PRV
@pytest.mark.parametrize("q,sigma", [(1e-3, 1.0), (0.1, 0.7), (0.5, 3.0), (1.0, 2.0)])
def test_pdf_is_derivative_of_cdf_and_cdf_plus_sf_is_one(q, sigma):
    prv = PoissonSubsampledGaussianPRV(q, sigma)
    lo = prv.support_min if q < 1 else -5.0
    ts = np.linspace(max(lo, -5.0) + 1e-3, 3.0, 50)
    h = 1e-6
    numeric = (prv.cdf(ts + h) - prv.cdf(ts - h)) / (2 * h)
    np.testing.assert_allclose(prv.pdf(ts), numeric, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(prv.cdf(ts) + prv.sf(ts), 1.0, atol=1e-14)
    if q < 1:
        assert prv.cdf(prv.support_min - 1e-3) == 0.0


@pytest.mark.parametrize("q,sigma", [(1e-2, 1.0), (0.2, 2.0), (0.6, 0.8)])
def test_cdf_against_sampling_the_mixture(q, sigma):
    """Y = log(Q/P)(w), w ~ Q: the empirical CDF of simulated losses matches cdf()."""
    rng = np.random.default_rng(0)
    n = 200_000
    w = rng.normal(size=n) * sigma + (rng.random(n) < q)
    losses = np.log1p(q * np.expm1((2 * w - 1) / (2 * sigma**2)))
    prv = PoissonSubsampledGaussianPRV(q, sigma)
    for t in np.quantile(losses, [0.05, 0.3, 0.5, 0.8, 0.99]):
        assert prv.cdf(t) == pytest.approx(np.mean(losses <= t), abs=4e-3)


@pytest.mark.parametrize("q,sigma,alpha", [(0.05, 1.0, 2.0), (0.3, 2.0, 3.5), (1.0, 1.5, 4.0)])
def test_rdp_is_log_mgf_of_the_prv(q, sigma, alpha):
    """E_Q[e^{(alpha-1) Y}] = e^{(alpha-1) RDP_alpha}: integrate the PRV density directly."""
    prv = PoissonSubsampledGaussianPRV(q, sigma)
    lo = prv.support_min if q < 1 else -30.0
    mgf, _ = integrate.quad(
        lambda t: math.exp((alpha - 1) * t) * float(prv.pdf(t)), lo, 40.0, limit=400, points=[0.0]
    )
    assert prv.rdp(alpha) == pytest.approx(math.log(mgf) / (alpha - 1), rel=1e-6)


@settings(max_examples=20, deadline=None)
@given(q=st.floats(1e-3, 0.999), sigma=st.floats(0.5, 10.0), lam=st.floats(0.1, 40.0))
def test_negative_mgf_bound_holds(q, sigma, lam):
    prv = PoissonSubsampledGaussianPRV(q, sigma)
    w_grid = np.linspace(-12 * sigma, 1 + 12 * sigma, 20001)
    density = prv._mixture_density(w_grid)
    values = np.exp(-lam * prv._y(w_grid))
    exact = integrate.simpson(values * density, x=w_grid)
    assert math.log(exact) <= float(prv.log_mgf_negative_bound(lam)) + 1e-9


def test_truncated_prv():
    prv = PoissonSubsampledGaussianPRV(0.05, 1.0)
    trunc = TruncatedPrivacyRandomVariable(prv, -0.03, 0.4)
    assert trunc.cdf(-0.5) == 0.0 and trunc.cdf(0.4) == 1.0 and trunc.cdf(1.0) == 1.0
    mass, _ = integrate.quad(lambda t: float(trunc.pdf(t)), -0.03, 0.4, limit=200, points=[0.0])
    assert mass == pytest.approx(1.0, abs=1e-8)
    mean, _ = integrate.quad(lambda t: t * float(trunc.pdf(t)), -0.03, 0.4, limit=200, points=[0.0])
    assert trunc.mean() == pytest.approx(mean, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize(
    "bad",
    [
        dict(sample_rate=0.0, noise_multiplier=1.0),
        dict(sample_rate=1.5, noise_multiplier=1.0),
        dict(sample_rate=0.1, noise_multiplier=0.0),
    ],
)
def test_prv_rejects_bad_parameters(bad):
    with pytest.raises(ValueError):
        PoissonSubsampledGaussianPRV(**bad)


# ---------------------------------------------------------------- domain, discretisation
def test_domain_alignment_and_shift():
    d = Domain.create_aligned(-1.234, 2.5, 0.01)
    assert d.t_min <= -1.234 and d.t_max >= 2.5
    assert d.dt == pytest.approx(0.01)
    assert abs(d.t_min / d.dt - round(d.t_min / d.dt)) < 1e-6
    assert np.allclose(np.diff(d.ts), d.dt) and len(d.ts) == len(d) == d.size
    s = d.shift_right(0.003)
    assert s.t_min == pytest.approx(d.t_min + 0.003) and s.shifts == pytest.approx(0.003)
    assert s.grid_offset() == d.grid_offset()
    with pytest.raises(ValueError):
        Domain(1.0, 0.0, 10)


def test_safe_domain_holds_the_composition():
    prv = PoissonSubsampledGaussianPRV(0.01, 1.0)
    t_min, t_max = compute_safe_domain_bounds([prv], [1000], 0.01, 1e-8)
    size = compute_safe_domain_size([prv], [1000], 0.01, 1e-8)
    assert size == max(-t_min, t_max)
    # The composed PRV (1000 steps) has mean 1000 * KL and the upper bound must exceed the
    # eps at delta = 1e-8, which is itself above the PLD value.
    assert t_max > pld_epsilon([(1.0, 0.01, 1000)], 1e-8, interval=1e-3)
    assert t_min < 0


def test_discretize_preserves_mass_and_mean():
    prv = PoissonSubsampledGaussianPRV(0.02, 1.2)
    domain = Domain.create_aligned(-0.5, 2.0, 1e-3)
    trunc = TruncatedPrivacyRandomVariable(
        prv, domain.t_min - domain.dt / 2, domain.t_max + domain.dt / 2
    )
    dprv = discretize(trunc, domain)
    assert dprv.pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.dot(dprv.pmf, dprv.domain.ts) == pytest.approx(trunc.mean(), rel=1e-9, abs=1e-15)
    assert abs(dprv.domain.shifts) <= domain.dt / 2
    # Each grid point holds the mass of its bin.
    j = np.searchsorted(domain.ts, 0.01)
    t = domain.ts[j]
    expected = trunc.cdf(t + domain.dt / 2) - trunc.cdf(t - domain.dt / 2)
    assert dprv.pmf[j] == pytest.approx(float(expected), rel=1e-9)


def brute_force_compose(dprvs, counts):
    """Distribution of the sum by explicit enumeration (values rounded to the grid)."""
    dist = {0.0: 1.0}
    for dprv, k in zip(dprvs, counts):
        for _ in range(k):
            new = {}
            for v, p in dist.items():
                for t, pt in zip(dprv.domain.ts, dprv.pmf):
                    if pt > 0:
                        key = round(v + t, 9)
                        new[key] = new.get(key, 0.0) + p * pt
            dist = new
    return dist


def test_compose_heterogeneous_matches_enumeration():
    base = Domain(-1.0, 2.0, 31)  # dt = 0.1, aligned (t_min = -10 dt)
    rng = np.random.default_rng(1)
    pmf_a = np.zeros(31)
    pmf_a[8:14] = rng.random(6)
    pmf_b = np.zeros(31)
    pmf_b[9:13] = rng.random(4)
    a = DiscretePRV(pmf_a / pmf_a.sum(), base.shift_right(0.013))
    b = DiscretePRV(pmf_b / pmf_b.sum(), base.shift_right(-0.021))
    composed = compose_heterogeneous([a, b], [3, 2])
    expected = brute_force_compose([a, b], [3, 2])
    got = {round(t, 9): p for t, p in zip(composed.domain.ts, composed.pmf) if p > 1e-15}
    assert set(got) == set(expected)
    for key, p in expected.items():
        assert got[key] == pytest.approx(p, rel=1e-9, abs=1e-15)
    assert composed.domain.shifts == pytest.approx(3 * 0.013 - 2 * 0.021)
    with pytest.raises(ValueError):
        compose_heterogeneous([a], [1, 2])
    with pytest.raises(ValueError):
        compose_heterogeneous([a, DiscretePRV(np.ones(11) / 11, Domain(0.0, 1.0, 11))], [1, 1])


def test_discrete_delta_and_epsilon_are_inverse():
    ts_domain = Domain(-2.0, 6.0, 801)
    rng = np.random.default_rng(2)
    pmf = rng.random(801) * np.exp(-0.5 * ts_domain.ts**2)
    dprv = DiscretePRV(pmf / pmf.sum(), ts_domain)
    ts = ts_domain.ts
    for eps in [0.0, 0.3, 1.234, 2.5]:
        brute = sum(p * (1 - math.exp(eps - t)) for p, t in zip(dprv.pmf, ts) if t > eps)
        assert dprv.compute_delta_estimate(eps) == pytest.approx(brute, rel=1e-10)
    for delta in [1e-2, 1e-4, 1e-6]:
        eps = dprv._epsilon_for_delta(delta)
        assert dprv.compute_delta_estimate(eps) == pytest.approx(delta, rel=1e-8)
    lower, est, upper = dprv.compute_epsilon(1e-4, 1e-6, 0.05)
    assert lower <= est <= upper
    with pytest.raises(ValueError):
        dprv.compute_epsilon(1e-4, 1e-3, 0.05)


# ---------------------------------------------------------------- the accountant
SLOW = pytest.mark.slow
GRID = [
    pytest.param(0.5, 1e-4, 100_000, marks=SLOW),
    pytest.param(0.5, 1e-2, 100, marks=SLOW),
    (1.0, 1e-4, 1),
    (1.0, 1e-2, 10_000),
    pytest.param(1.0, 0.1, 100, marks=SLOW),
    (1.0, 1.0, 1),
    pytest.param(2.0, 1e-2, 100_000, marks=SLOW),
    (2.0, 0.1, 1),
    (5.0, 0.1, 10_000),
    (5.0, 1.0, 100),
    (10.0, 1e-4, 100),
    (10.0, 1.0, 100),
]


@pytest.mark.parametrize("sigma,q,steps", GRID)
def test_prv_brackets_pld(sigma, q, steps):
    lower, est, upper = prv_bounds([(sigma, q, steps)], 1e-5)
    pld = pld_epsilon([(sigma, q, steps)], 1e-5)
    assert lower <= est <= upper
    assert upper - lower <= 2 * 0.01 + 2e-3
    # dp_accounting's pessimistic PLD sits a discretisation step above the truth.
    assert lower - 1e-9 <= pld <= upper + 2e-3
    rdp = RDPAccountant()
    rdp.history = [(sigma, q, steps)]
    assert rdp.get_epsilon(1e-5) >= lower  # RDP is a valid, looser, upper bound


def test_heterogeneous_history_matches_pld():
    events = [(1.0, 0.01, 500), (2.0, 0.05, 300), (0.8, 0.002, 2000)]
    acc = PRVAccountant()
    for sigma, q, steps in events:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert acc.history == events and len(acc) == 2800
    lower, est, upper = acc.compute_epsilon(1e-6)
    pld = pld_epsilon(events, 1e-6)
    assert lower - 1e-9 <= pld <= upper + 2e-3
    assert acc.get_epsilon(1e-6) == pytest.approx(upper)
    # Order does not matter and repeated settings merge.
    shuffled = prv_bounds(events[::-1] + [(1.0, 0.01, 0)], 1e-6)
    assert shuffled == pytest.approx((lower, est, upper), abs=1e-6)


def test_eps_error_controls_the_width():
    events = [(1.0, 0.01, 1000)]
    coarse = prv_bounds(events, 1e-5, eps_error=0.1)
    fine = prv_bounds(events, 1e-5, eps_error=0.002)
    assert coarse[2] - coarse[0] > fine[2] - fine[0]
    assert fine[2] - fine[0] <= 2 * 0.002 + 1e-3
    assert coarse[0] <= fine[1] <= coarse[2]


def test_coarsened_grid_stays_valid(monkeypatch):
    """A history needing more than MAX_DOMAIN_SIZE points gets a coarser grid: wider, still
    valid bounds."""
    import opacus.accountants.prv as prv_module

    events = [(1.0, 0.01, 1000)]
    fine = prv_bounds(events, 1e-5)
    monkeypatch.setattr(prv_module, "MAX_DOMAIN_SIZE", 2000)
    coarse = prv_bounds(events, 1e-5)
    assert coarse[2] - coarse[0] > fine[2] - fine[0]
    assert coarse[0] <= fine[1] <= coarse[2]


def test_accountant_edge_cases():
    acc = PRVAccountant()
    assert acc.get_epsilon(1e-5) == 0.0
    acc.step(noise_multiplier=1.0, sample_rate=0.0)
    assert acc.get_epsilon(1e-5) == 0.0
    acc.step(noise_multiplier=0.0, sample_rate=0.1)
    assert acc.get_epsilon(1e-5) == math.inf
    acc = PRVAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="delta_error"):
        acc.get_epsilon(1e-5, delta_error=1e-5)
    with pytest.raises(ValueError, match="eps_error"):
        acc.get_epsilon(1e-5, eps_error=0.0)
    with pytest.raises(ValueError, match="delta"):
        acc.get_epsilon(1.5)


@settings(max_examples=8, deadline=None)
@given(
    sigma=st.floats(0.6, 8.0),
    q=st.floats(1e-3, 1.0),
    steps=st.integers(1, 3000),
)
def test_prv_properties(sigma, q, steps):
    lower, est, upper = prv_bounds([(sigma, q, steps)], 1e-5)
    assert 0 <= lower <= est <= upper
    rdp = RDPAccountant()
    rdp.history = [(sigma, q, steps)]
    assert rdp.get_epsilon(1e-5) >= lower
    more = prv_bounds([(sigma, q, steps * 2)], 1e-5)
    assert more[2] >= lower

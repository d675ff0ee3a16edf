"""RDP analysis and accountant against dp_accounting, closed forms and a high-precision integral."""

import math

import dp_accounting
import mpmath
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as analysis

SIGMAS = [0.5, 1.0, 2.0, 5.0, 10.0]
QS = [1e-4, 1e-2, 0.1, 1.0]
INTEGER_ORDERS = [2, 3, 4, 5, 8, 12, 16, 32, 63]


def dp_accounting_rdp(sigma, q, steps, orders):
    acc = RdpAccountant(orders=orders)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(event, steps)
    return np.asarray(acc.rdp), acc


def rdp_by_integration(q, sigma, alpha):
    """log E_{mu0}[(mu1/mu0)^alpha] / (alpha - 1) by 40-digit quadrature (MTZ definition)."""
    mpmath.mp.dps = 40
    q, s, a = mpmath.mpf(q), mpmath.mpf(sigma), mpmath.mpf(alpha)

    def integrand(z):
        ratio = (1 - q) + q * mpmath.exp((2 * z - 1) / (2 * s * s))
        return mpmath.npdf(z, 0, s) * ratio**a

    z0 = s * s * mpmath.log(1 / q - 1) + mpmath.mpf(1) / 2
    a_alpha = mpmath.quad(integrand, [-mpmath.inf, -10 * s, 0, z0, z0 + 10 * s, mpmath.inf])
    return float(mpmath.log(a_alpha) / (a - 1))


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("q", QS)
def test_integer_orders_match_dp_accounting(sigma, q):
    ours = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=INTEGER_ORDERS)
    ref, _ = dp_accounting_rdp(sigma, q, 1, INTEGER_ORDERS)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize(
    "q,sigma,alpha",
    [
        (1e-4, 1.0, 1.1),
        (1e-2, 1.0, 1.5),
        (0.1, 5.0, 1.1),
        (0.1, 5.0, 2.5),
        (0.5, 0.5, 1.3),
        (0.5, 10.0, 1.1),
        (0.9, 2.0, 3.7),
        (1e-2, 0.5, 7.3),
    ],
)
def test_fractional_orders_match_high_precision_integral(q, sigma, alpha):
    ours = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=alpha)
    assert ours == pytest.approx(rdp_by_integration(q, sigma, alpha), rel=1e-8)


@pytest.mark.parametrize("q,sigma", [(0.01, 0.7), (0.3, 3.0), (0.9, 1.0)])
def test_fractional_series_at_integer_order_equals_binomial_sum(q, sigma):
    alphas = np.array([2.0, 3.0, 7.0])
    np.testing.assert_allclose(
        analysis._log_a_fractional(q, sigma, alphas),
        analysis._log_a_integer(q, sigma, alphas),
        rtol=1e-10,
    )


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("steps", [1, 100, 10_000, 100_000])
def test_q_one_is_gaussian_closed_form(sigma, steps):
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = analysis.compute_rdp(q=1.0, noise_multiplier=sigma, steps=steps, orders=orders)
    np.testing.assert_allclose(rdp, steps * np.asarray(orders) / (2 * sigma**2), rtol=1e-12)


def test_degenerate_inputs():
    orders = [1.5, 2, 32]
    assert np.all(analysis.compute_rdp(q=0.0, noise_multiplier=1.0, steps=10, orders=orders) == 0)
    assert np.all(
        np.isinf(analysis.compute_rdp(q=0.1, noise_multiplier=0.0, steps=1, orders=orders))
    )
    assert np.all(analysis.compute_rdp(q=0.1, noise_multiplier=1.0, steps=0, orders=orders) == 0)
    assert isinstance(analysis.compute_rdp(q=0.1, noise_multiplier=1.0, steps=3, orders=2.0), float)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(q=-0.1, noise_multiplier=1.0, steps=1, orders=[2]),
        dict(q=1.1, noise_multiplier=1.0, steps=1, orders=[2]),
        dict(q=0.1, noise_multiplier=-1.0, steps=1, orders=[2]),
        dict(q=0.1, noise_multiplier=1.0, steps=-1, orders=[2]),
        dict(q=0.1, noise_multiplier=1.0, steps=1, orders=[1.0]),
        dict(q=0.1, noise_multiplier=1.0, steps=1, orders=[0.5]),
    ],
)
def test_compute_rdp_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        analysis.compute_rdp(**kwargs)


def test_privacy_spent_is_balle_conversion_minimised():
    orders = np.array([1.5, 2.0, 8.0, 32.0])
    rdp = np.array([0.1, 0.2, 1.0, 3.0])
    delta = 1e-5
    expected = (
        rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    )
    eps, alpha = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert eps == pytest.approx(expected.min())
    assert alpha == orders[np.argmin(expected)]
    eps_inf, _ = analysis.get_privacy_spent(orders=[2, 3], rdp=[np.inf, np.inf], delta=delta)
    assert eps_inf == math.inf
    with pytest.raises(ValueError, match="delta"):
        analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=0.0)
    with pytest.raises(ValueError, match="same length"):
        analysis.get_privacy_spent(orders=orders, rdp=rdp[:2], delta=delta)


@pytest.mark.parametrize(
    "sigma,q,steps",
    [
        (0.5, 1e-2, 100),
        (1.0, 1e-3, 100_000),
        (2.0, 0.1, 10_000),
        (5.0, 1.0, 1),
        (10.0, 1e-4, 10_000),
        (1.0, 0.1, 1),
        (2.0, 1e-2, 100_000),
    ],
)
def test_epsilon_matches_dp_accounting(sigma, q, steps):
    _, ref = dp_accounting_rdp(sigma, q, steps, INTEGER_ORDERS)
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    assert acc.get_epsilon(1e-5, alphas=INTEGER_ORDERS) == pytest.approx(
        ref.get_epsilon(1e-5), rel=1e-9
    )
    # Fractional default orders can only help.
    assert acc.get_epsilon(1e-5) <= ref.get_epsilon(1e-5) + 1e-12


def test_heterogeneous_history_adds_rdp():
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    for _ in range(2):
        acc.step(noise_multiplier=2.0, sample_rate=0.05)
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert acc.history == [(1.0, 0.01, 3), (2.0, 0.05, 2), (1.0, 0.01, 1)]
    assert len(acc) == 6
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = analysis.compute_rdp(q=0.01, noise_multiplier=1.0, steps=4, orders=orders)
    rdp = rdp + analysis.compute_rdp(q=0.05, noise_multiplier=2.0, steps=2, orders=orders)
    expected = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-6)
    assert acc.get_privacy_spent(delta=1e-6) == pytest.approx(expected)


def test_accountant_edge_cases():
    acc = RDPAccountant()
    assert acc.get_epsilon(1e-5) == 0.0
    acc.step(noise_multiplier=0.0, sample_rate=0.1)
    assert acc.get_epsilon(1e-5) == math.inf
    other = RDPAccountant()
    other.step(noise_multiplier=1.0, sample_rate=0.0)
    assert other.get_epsilon(1e-5) == 0.0
    # The bare conversion of a zero curve only reaches its floor.
    floor, _ = analysis.get_privacy_spent(
        orders=RDPAccountant.DEFAULT_ALPHAS,
        rdp=np.zeros(len(RDPAccountant.DEFAULT_ALPHAS)),
        delta=1e-5,
    )
    assert 0 < floor < 0.11
    for bad in (0.0, 1.0, -1e-5, 2.0):
        with pytest.raises(ValueError, match="delta"):
            other.get_epsilon(bad)


@settings(max_examples=25, deadline=None)
@given(
    sigma=st.floats(0.3, 20.0),
    q=st.floats(1e-5, 1.0),
    steps=st.integers(1, 10**6),
)
def test_rdp_properties(sigma, q, steps):
    orders = [1.25, 1.5, 2.0, 2.5, 4.0, 8.0, 16.0, 32.0]
    one = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    many = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    np.testing.assert_allclose(many, steps * one, rtol=1e-12)
    # RDP is non-decreasing in the order, bounded by the unsampled Gaussian, decreasing in sigma.
    assert np.all(np.diff(one) >= -1e-12 * np.abs(one[1:]))
    assert np.all(one <= np.asarray(orders) / (2 * sigma**2) * (1 + 1e-9))
    noisier = analysis.compute_rdp(q=q, noise_multiplier=1.5 * sigma, steps=1, orders=orders)
    assert np.all(noisier <= one * (1 + 1e-9))

"""Gaussian differential privacy (GDP) of noisy SGD via the central limit theorem.

Maths (Dong, Roth, Su 2019, "Gaussian Differential Privacy"; Bu, Dong, Long, Su 2020, "Deep
Learning with Gaussian Differential Privacy"):
- mu-GDP means the trade-off curve is at least that of N(0, 1) vs N(mu, 1); it is equivalent to
  (eps, delta(eps))-DP for every eps >= 0 with
  delta(eps) = Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2)   (DRS Cor 2.13).
- T steps of the Gaussian mechanism with noise multiplier sigma on a Poisson subsample of rate p
  converge (p sqrt(T) fixed, T -> infinity) to mu-GDP with mu = p sqrt(T (e^{1/sigma^2} - 1)).
- With uniform subsampling without replacement (DRS Cor 5.4) the limit is
  mu = p sqrt(2 T (e^{1/sigma^2} Phi(1.5 / sigma) + 3 Phi(-0.5 / sigma) - 2)).
These are asymptotic approximations, not upper bounds: prefer the RDP or PRV accountants when a
certified guarantee is needed. This module does not depend on torch.
"""

import math

from scipy.optimize import brentq
from scipy.special import erf, log_ndtr, ndtr


def _check(steps: int, noise_multiplier: float, sample_rate: float) -> None:
    if steps < 0:
        raise ValueError(f"opacus.accountants.analysis.gdp: steps must be >= 0, got {steps!r}.")
    if not noise_multiplier > 0:
        raise ValueError(
            "opacus.accountants.analysis.gdp: noise_multiplier must be > 0 (sigma = 0 gives no "
            f"privacy), got {noise_multiplier!r}."
        )
    if not 0 <= sample_rate <= 1:
        raise ValueError(
            f"opacus.accountants.analysis.gdp: sample_rate must be in [0, 1], got {sample_rate!r}."
        )


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(
            f"opacus.accountants.analysis.gdp: delta must be in (0, 1), got {delta!r}."
        )


def compute_mu_poisson(*, steps: int, noise_multiplier: float, sample_rate: float) -> float:
    """CLT mu of ``steps`` Poisson-subsampled Gaussian steps: p sqrt(T (e^{1/sigma^2} - 1)).

    Args:
        steps: number of steps.
        noise_multiplier: sigma (> 0).
        sample_rate: Poisson sampling probability in [0, 1].

    Returns:
        the mu of the mu-GDP guarantee.
    """
    _check(steps, noise_multiplier, sample_rate)
    return sample_rate * math.sqrt(steps * math.expm1(noise_multiplier**-2))


def compute_mu_uniform(*, steps: int, noise_multiplier: float, sample_rate: float) -> float:
    """CLT mu of ``steps`` uniformly subsampled Gaussian steps (DRS Cor 5.4).

    Args:
        steps: number of steps.
        noise_multiplier: sigma (> 0).
        sample_rate: batch size divided by the dataset size, in [0, 1].

    Returns:
        the mu of the mu-GDP guarantee.
    """
    _check(steps, noise_multiplier, sample_rate)
    x = 1.0 / noise_multiplier
    # e^{x^2} Phi(1.5x) + 3 Phi(-0.5x) - 2 written without the O(1) cancellation:
    # expm1(x^2) Phi(1.5x) + (Phi(1.5x) - 1/2) - 3 (Phi(0.5x) - 1/2), with Phi(a) - 1/2 = erf/2.
    inner = math.expm1(x * x) * ndtr(1.5 * x) + 0.5 * (
        erf(1.5 * x / math.sqrt(2.0)) - 3.0 * erf(0.5 * x / math.sqrt(2.0))
    )
    return sample_rate * math.sqrt(2.0 * steps * max(inner, 0.0))


def delta_eps_mu(*, eps: float, mu: float) -> float:
    """delta(eps) of a mu-GDP mechanism (DRS Cor 2.13).

    Args:
        eps: the ε at which δ is wanted.
        mu: the mu of the mechanism (>= 0).

    Returns:
        δ(ε) of a mu-GDP mechanism.

    Raises:
        ValueError: ``mu`` is negative.
    """
    if not mu >= 0:
        raise ValueError(f"opacus.accountants.analysis.gdp: mu must be >= 0, got {mu!r}.")
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    # e^eps Phi(.) in log space so large eps does not overflow.
    second = math.exp(eps + log_ndtr(-eps / mu - mu / 2.0))
    return max(float(ndtr(-eps / mu + mu / 2.0)) - second, 0.0)


def eps_from_mu(*, mu: float, delta: float) -> float:
    """Smallest eps >= 0 with delta_eps_mu(eps, mu) <= delta (delta(eps) decreases in eps).

    Args:
        mu: the mu of the mechanism (>= 0).
        delta: the δ in (0, 1).

    Returns:
        the smallest ε >= 0 whose δ(ε) is at most ``delta``.

    Raises:
        ValueError: ``mu`` is negative or ``delta`` is not in (0, 1).
    """
    _check_delta(delta)
    if not mu >= 0:
        raise ValueError(f"opacus.accountants.analysis.gdp: mu must be >= 0, got {mu!r}.")
    if math.isinf(mu):
        return math.inf
    if delta_eps_mu(eps=0.0, mu=mu) <= delta:
        return 0.0
    upper = max(1.0, mu)
    while delta_eps_mu(eps=upper, mu=mu) > delta:
        upper *= 2.0

    def gap(eps: float) -> float:
        return delta_eps_mu(eps=eps, mu=mu) - delta

    return float(brentq(gap, 0.0, upper, xtol=1e-12, rtol=1e-12))


def compute_eps_poisson(
    *, steps: int, noise_multiplier: float, sample_rate: float, delta: float
) -> float:
    """eps at ``delta`` of the CLT mu for Poisson subsampling.

    Args:
        steps: number of steps.
        noise_multiplier: sigma (> 0).
        sample_rate: Poisson sampling probability in [0, 1].
        delta: δ in (0, 1).

    Returns:
        ε at ``delta`` of the CLT approximation (not a certified bound).
    """
    mu = compute_mu_poisson(steps=steps, noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return eps_from_mu(mu=mu, delta=delta)


def compute_eps_uniform(
    *, steps: int, noise_multiplier: float, sample_rate: float, delta: float
) -> float:
    """eps at ``delta`` of the CLT mu for uniform subsampling without replacement.

    Args:
        steps: number of steps.
        noise_multiplier: sigma (> 0).
        sample_rate: batch size divided by the dataset size, in [0, 1].
        delta: δ in (0, 1).

    Returns:
        ε at ``delta`` of the CLT approximation (not a certified bound).
    """
    mu = compute_mu_uniform(steps=steps, noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return eps_from_mu(mu=mu, delta=delta)

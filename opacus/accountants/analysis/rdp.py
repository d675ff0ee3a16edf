"""Rényi DP of the Poisson-subsampled Gaussian mechanism and its conversion to (eps, delta)-DP.

Maths:
- Mironov 2017, "Rényi Differential Privacy": RDP composes additively over steps.
- Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism"
  (MTZ): with mu0 = N(0, sigma^2) and mu1 = (1 - q) mu0 + q N(1, sigma^2), the RDP of order
  alpha is log(A_alpha) / (alpha - 1), A_alpha = E_{z ~ mu0}[(mu1(z) / mu0(z))^alpha].
  Integer alpha: binomial expansion (MTZ Sec. 3.3, eq. for A_alpha with a finite sum).
  Fractional alpha: split the integral at z0 = sigma^2 log(1/q - 1) + 1/2, where the two
  mixture components of the likelihood ratio are equal, and expand each side with the
  generalised binomial series; the Gaussian tail factors are evaluated as log Phi (log-erfc).
  Everything is summed in log space (signed log-sum-exp) so large orders / small sigma do
  not overflow.
- Balle, Barthe, Gaboardi, Hsu, Sato 2020, "Hypothesis testing interpretations and Rényi
  differential privacy", Thm 21: (alpha, rho)-RDP implies (eps, delta)-DP with
  eps = rho - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha).

This module does not depend on torch.
"""

import math
from functools import lru_cache
from typing import List, Tuple, Union

import numpy as np
from scipy.special import gammaln, log_ndtr, logsumexp

# A fractional-order series is stopped once the last terms of a block are this many nats below
# the running sum (~7e-13 relative). Past alpha the tail alternates with slowly (polynomially)
# decreasing terms, so its sum is at most the first omitted term, and about minus half the last
# included term: adding that half-term correction (the averaged partial sum) leaves an error of
# the order of the difference of consecutive terms, far below the tolerance.
_SERIES_LOG_TOLERANCE = 28.0
_SERIES_FIRST_BLOCK = 32
# Terms at the end of a block that must all be negligible before the series is cut: past alpha
# the first series decreases until z0 and then flattens at that level, the second one only
# decreases, so negligible terms past alpha stay negligible.
_SERIES_TAIL_CHECK = 8
_SERIES_MAX_TERMS = 1 << 22


def _check_order(alpha: float) -> None:
    if not alpha > 1 or math.isnan(alpha):
        raise ValueError(
            f"opacus.accountants.analysis.rdp: RDP orders must be > 1, got {alpha!r}. "
            "Pass orders such as [1.5, 2, 4, 8, 16, 32, 64]."
        )


def _log_a_integer(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha for integer alphas: finite binomial sum (MTZ, integer case), vectorised."""
    alphas = np.asarray(alphas, dtype=np.float64)[:, None]
    k = np.arange(int(alphas.max()) + 1, dtype=np.float64)[None, :]
    inside = k <= alphas
    kk = np.where(inside, k, 0.0)
    log_binom = gammaln(alphas + 1.0) - gammaln(kk + 1.0) - gammaln(alphas - kk + 1.0)
    log_terms = (
        log_binom
        + kk * math.log(q)
        + (alphas - kk) * math.log1p(-q)
        + (kk * kk - kk) / (2.0 * sigma**2)
    )
    return logsumexp(np.where(inside, log_terms, -np.inf), axis=1)


def _log_abs_binom_and_sign(alpha: np.ndarray, i: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """log|C(alpha, i)| and sign(C(alpha, i)) for real alpha > 0 and integer i >= 0.

    C(alpha, i) = alpha (alpha - 1) ... (alpha - i + 1) / i!; the factors alpha - j turn
    negative once j > alpha, so the sign alternates for i > ceil(alpha).
    """
    log_abs = gammaln(alpha + 1.0) - gammaln(i + 1.0) - gammaln(alpha - i + 1.0)
    negatives = np.maximum(i - np.ceil(alpha), 0.0)
    sign = np.where(negatives % 2 == 0, 1.0, -1.0)
    return log_abs, sign


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha for non-integer alphas (MTZ, fractional case), vectorised over alphas.

    A_alpha = sum_i C(alpha, i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 sigma^2))
                    Phi((z0 - i) / sigma)
            + sum_i C(alpha, i) q^(alpha-i) (1-q)^i exp(((alpha-i)^2 - (alpha-i)) / (2 sigma^2))
                    Phi((alpha - i - z0) / sigma)
    """
    alphas = np.asarray(alphas, dtype=np.float64)[:, None]
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    two_var = 2.0 * sigma**2

    n = alphas.shape[0]
    log_pos = np.full(n, -np.inf)
    log_neg = np.full(n, -np.inf)
    active = np.ones(n, dtype=bool)
    start, block = 0, _SERIES_FIRST_BLOCK
    while active.any():
        if start >= _SERIES_MAX_TERMS:
            raise RuntimeError(
                "opacus.accountants.analysis.rdp: the fractional-order RDP series did not "
                f"converge (q={q}, noise_multiplier={sigma}); use integer orders instead."
            )
        a = alphas[active]
        i = np.arange(start, start + block, dtype=np.float64)[None, :]
        log_binom, sign = _log_abs_binom_and_sign(a, i)
        first = (
            log_binom
            + i * log_q
            + (a - i) * log_1mq
            + (i * i - i) / two_var
            + log_ndtr((z0 - i) / sigma)
        )
        j = a - i
        second = (
            log_binom + j * log_q + i * log_1mq + (j * j - j) / two_var + log_ndtr((j - z0) / sigma)
        )
        terms = np.concatenate([first, second], axis=1)
        signs = np.concatenate([sign, sign], axis=1)
        pos = logsumexp(np.where(signs > 0, terms, -np.inf), axis=1)
        neg = logsumexp(np.where(signs < 0, terms, -np.inf), axis=1)
        log_pos[active] = np.logaddexp(log_pos[active], pos)
        log_neg[active] = np.logaddexp(log_neg[active], neg)

        tail = np.concatenate(
            [first[:, -_SERIES_TAIL_CHECK:], second[:, -_SERIES_TAIL_CHECK:]], axis=1
        )
        past_peak = start + block - _SERIES_TAIL_CHECK > a[:, 0]
        done = past_peak & (tail.max(axis=1) < log_pos[active] - _SERIES_LOG_TOLERANCE)
        idx = np.flatnonzero(active)
        finished = idx[done]
        last_log = np.logaddexp(first[done, -1], second[done, -1]) - math.log(2.0)
        last_positive = sign[done, -1] > 0
        log_neg[finished[last_positive]] = np.logaddexp(
            log_neg[finished[last_positive]], last_log[last_positive]
        )
        log_pos[finished[~last_positive]] = np.logaddexp(
            log_pos[finished[~last_positive]], last_log[~last_positive]
        )
        active[finished] = False
        start += block
        block *= 2

    with np.errstate(divide="ignore"):
        return log_pos + np.log1p(-np.exp(log_neg - log_pos))


@lru_cache(maxsize=512)
def _rdp_single_step(q: float, sigma: float, orders: Tuple[float, ...]) -> Tuple[float, ...]:
    """RDP of one step of the sampled Gaussian mechanism at each order (cached: accountants
    query the same (q, sigma) over and over during training)."""
    for alpha in orders:
        _check_order(alpha)
    if q == 0:
        return tuple(0.0 for _ in orders)
    if sigma == 0:
        return tuple(math.inf for _ in orders)
    if math.isinf(sigma):
        return tuple(0.0 for _ in orders)
    if q == 1:
        # No subsampling: the Gaussian mechanism, RDP = alpha / (2 sigma^2) (Mironov 2017, Prop 7).
        return tuple(alpha / (2.0 * sigma**2) for alpha in orders)

    alphas = np.asarray(orders, dtype=np.float64)
    out = np.full(len(orders), np.inf)
    integer = np.isfinite(alphas) & (alphas == np.floor(alphas))
    fractional = np.isfinite(alphas) & ~integer
    if integer.any():
        out[integer] = _log_a_integer(q, sigma, alphas[integer]) / (alphas[integer] - 1.0)
    if fractional.any():
        out[fractional] = _log_a_fractional(q, sigma, alphas[fractional]) / (
            alphas[fractional] - 1.0
        )
    # A_alpha >= 1 by Jensen; clip round-off below zero.
    return tuple(float(max(v, 0.0)) for v in out)


def _check_q_sigma(q: float, noise_multiplier: float) -> None:
    if not 0 <= q <= 1:
        raise ValueError(
            f"opacus.accountants.analysis.rdp: sample rate q must be in [0, 1], got {q!r}."
        )
    if not noise_multiplier >= 0:
        raise ValueError(
            "opacus.accountants.analysis.rdp: noise_multiplier must be >= 0, "
            f"got {noise_multiplier!r}."
        )


def compute_rdp(
    *,
    q: float,
    noise_multiplier: float,
    steps: int,
    orders: Union[List[float], float],
) -> Union[List[float], float]:
    """RDP of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    Args:
        q: sampling rate in [0, 1] (0: nothing is released, RDP 0; 1: plain Gaussian).
        noise_multiplier: sigma, noise std divided by the L2 sensitivity (0 gives infinite RDP).
        steps: number of compositions (RDP adds up, Mironov 2017 Prop 1).
        orders: a single order or a list of orders, each > 1.

    Returns:
        RDP at each order (a numpy array for a list of orders, a float for a scalar order).

    Raises:
        ValueError: ``steps`` is negative, ``q`` is not in [0, 1], ``noise_multiplier`` is negative
            or an order is not above 1.
    """
    _check_q_sigma(q, noise_multiplier)
    if steps < 0:
        raise ValueError(f"opacus.accountants.analysis.rdp: steps must be >= 0, got {steps!r}.")
    scalar = np.isscalar(orders)
    orders_t = (float(orders),) if scalar else tuple(float(a) for a in orders)
    per_step = np.asarray(_rdp_single_step(float(q), float(noise_multiplier), orders_t))
    with np.errstate(invalid="ignore"):
        rdp = np.where(steps == 0, 0.0, per_step * steps)
    return float(rdp[0]) if scalar else rdp


def get_privacy_spent(
    *,
    orders: Union[List[float], float],
    rdp: Union[List[float], float],
    delta: float,
) -> Tuple[float, float]:
    """Convert an RDP curve to (eps, delta)-DP: the best order under Balle et al. 2020, Thm 21.

    Returns:
        ``(eps, best_alpha)``; eps is clipped at 0 and is ``inf`` if every order is infinite.

    Args:
        orders: the Rényi orders of the curve.
        rdp: the RDP at each order.
        delta: the target δ in (0, 1).

    Raises:
        ValueError: ``delta`` is not in (0, 1), or ``orders`` and ``rdp`` differ in length.
    """
    if not 0 < delta < 1:
        raise ValueError(
            f"opacus.accountants.analysis.rdp.get_privacy_spent: delta must be in (0, 1), "
            f"got {delta!r}."
        )
    orders_vec = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    rdp_vec = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    if orders_vec.shape != rdp_vec.shape:
        raise ValueError(
            "opacus.accountants.analysis.rdp.get_privacy_spent: orders and rdp must have the "
            f"same length, got {orders_vec.shape} and {rdp_vec.shape}."
        )
    for alpha in orders_vec:
        _check_order(float(alpha))
    with np.errstate(invalid="ignore"):
        eps = (
            rdp_vec
            - (math.log(delta) + np.log(orders_vec)) / (orders_vec - 1.0)
            + np.log((orders_vec - 1.0) / orders_vec)
        )
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return float(max(eps[best], 0.0)), float(orders_vec[best])

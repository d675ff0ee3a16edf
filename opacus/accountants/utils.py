"""Calibrating the noise multiplier to a privacy budget."""

import math
from typing import Optional

from scipy.optimize import brentq

from opacus.accountants.analysis import gdp
from opacus.accountants.registry import create_accountant

__all__ = ["get_noise_multiplier", "create_accountant"]

# Noise multipliers searched: beyond MAX_SIGMA the budget is declared unreachable (epsilon
# conversions have floors, e.g. RDP cannot certify eps much below 0.1 with its default orders).
MAX_SIGMA = 1e6
MIN_SIGMA = 1e-3
_MAX_ITERATIONS = 100


def _gdp_guess(target_epsilon: float, target_delta: float, sample_rate: float, steps: int) -> float:
    """sigma meeting the target under the Poisson GDP CLT: solve delta(eps; mu) = delta for mu,
    then invert mu = q sqrt(T (e^{1/sigma^2} - 1))."""

    def gap(mu: float) -> float:
        return gdp.delta_eps_mu(eps=target_epsilon, mu=mu) - target_delta

    high = 1.0
    while gap(high) < 0 and high < 1e3:
        high *= 2.0
    if gap(high) < 0:
        return 1.0
    mu = brentq(gap, 1e-12, high, xtol=1e-10)
    sigma = 1.0 / math.sqrt(math.log1p(mu * mu / (sample_rate * sample_rate * steps)))
    return min(max(sigma, MIN_SIGMA), MAX_SIGMA)


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    epochs: Optional[int] = None,
    steps: Optional[int] = None,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
    **kwargs,
) -> float:
    """The noise multiplier sigma whose epsilon is in [target - tolerance, target].

    The returned sigma never overshoots: ``eps(sigma) <= target_epsilon`` as computed by the
    chosen accountant (for "prv": its certified upper bound). Give exactly one of ``epochs`` or
    ``steps``; epochs are converted as ``steps = int(epochs / sample_rate)``. Extra ``kwargs``
    go to the accountant's ``get_epsilon`` (e.g. ``eps_error`` for "prv").

    The search starts from the GDP CLT solution, brackets sigma by geometrically growing
    multiplicative steps and then interpolates log(eps) against
    log(sigma) (safeguarded, falling back to bisection), since eps(sigma) is decreasing and close
    to a power law.

    Raises:
        ValueError: invalid arguments, or a target that even ``MAX_SIGMA`` cannot reach.
    """
    where = "opacus.accountants.utils.get_noise_multiplier"
    if (epochs is None) == (steps is None):
        raise ValueError(f"{where}: give exactly one of epochs or steps (got {epochs=}, {steps=}).")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"{where}: sample_rate must be in (0, 1], got {sample_rate!r}.")
    if not 0 < target_delta < 1:
        raise ValueError(f"{where}: target_delta must be in (0, 1), got {target_delta!r}.")
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"{where}: target_epsilon must be finite and > 0, got {target_epsilon!r}.")
    if not epsilon_tolerance > 0:
        raise ValueError(f"{where}: epsilon_tolerance must be > 0, got {epsilon_tolerance!r}.")
    if steps is None:
        if not epochs > 0:
            raise ValueError(f"{where}: epochs must be > 0, got {epochs!r}.")
        steps = int(epochs / sample_rate)
    if int(steps) != steps or steps < 1:
        raise ValueError(f"{where}: steps must be an integer >= 1, got {steps!r}.")
    steps = int(steps)
    create_accountant(accountant)  # fail fast on an unknown name

    def epsilon(sigma: float) -> float:
        acc = create_accountant(accountant)
        acc.history = [(sigma, sample_rate, steps)]
        return acc.get_epsilon(delta=target_delta, **kwargs)

    # Bracket eps(low) > target >= eps(high), starting from the GDP CLT value (closed form, close
    # to the truth for small sample rates) and widening the multiplicative step geometrically.
    start = _gdp_guess(target_epsilon, target_delta, sample_rate, steps)
    eps_start = epsilon(start)
    factor = 1.1
    if eps_start > target_epsilon:
        low, eps_low = start, eps_start
        high, eps_high = start, eps_start
        while eps_high > target_epsilon:
            low, eps_low = high, eps_high
            high = min(high * factor, MAX_SIGMA)
            factor *= factor
            eps_high = epsilon(high)
            if eps_high > target_epsilon and high >= MAX_SIGMA:
                raise ValueError(
                    f"{where}: target_epsilon={target_epsilon} is unreachable with the "
                    f"{accountant!r} accountant: even noise_multiplier={high:g} gives "
                    f"epsilon={eps_high:g}. Raise target_epsilon or target_delta, or use fewer "
                    "steps / a smaller sample_rate."
                )
    else:
        high, eps_high = start, eps_start
        low, eps_low = start, eps_start
        while eps_low <= target_epsilon:
            high, eps_high = low, eps_low
            if low <= MIN_SIGMA:
                return high  # even almost no noise meets the budget
            low = max(low / factor, MIN_SIGMA)
            factor *= factor
            eps_low = epsilon(low)

    floor = target_epsilon - epsilon_tolerance
    aim = target_epsilon - epsilon_tolerance / 2.0
    for iteration in range(_MAX_ITERATIONS):
        if eps_high >= floor:
            return high
        log_lo, log_hi = math.log(low), math.log(high)
        interpolate = iteration % 3 != 2 and math.isfinite(eps_low) and eps_high > 0 and aim > 0
        if interpolate:
            slope = (math.log(eps_high) - math.log(eps_low)) / (log_hi - log_lo)
            x = log_lo + (math.log(aim) - math.log(eps_low)) / slope
            margin = 0.02 * (log_hi - log_lo)
            x = min(max(x, log_lo + margin), log_hi - margin)
        else:
            x = 0.5 * (log_lo + log_hi)
        mid = math.exp(x)
        eps_mid = epsilon(mid)
        if eps_mid > target_epsilon:
            low, eps_low = mid, eps_mid
        else:
            high, eps_high = mid, eps_mid
        if high - low <= 1e-12 * high:
            break
    return high

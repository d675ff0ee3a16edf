"""Calibrating the noise multiplier to a privacy budget."""

import math
from typing import Callable, Optional

from opacus.accountants.registry import create_accountant

__all__ = ["get_noise_multiplier", "create_accountant", "steps_from_epochs"]

# The bracket starts at SIGMA_START (first value tried: twice that) and gives up beyond MAX_SIGMA.
SIGMA_START = 10.0
MAX_SIGMA = 1e6

_WHERE = "opacus.accountants.utils.get_noise_multiplier"


def steps_from_epochs(epochs: float, sample_rate: float) -> int:
    """Number of optimizer steps in ``epochs`` epochs at ``sample_rate``: ``int(epochs /
    sample_rate)`` (truncated, as Opacus 1.6's ``get_noise_multiplier`` and the samplers' length
    ``int(1 / sample_rate)`` count them).

    Raises:
        ValueError: ``epochs`` is not > 0 or ``sample_rate`` is not in (0, 1].
    """
    where = "opacus.accountants.utils.steps_from_epochs"
    if not 0 < sample_rate <= 1:
        raise ValueError(f"{where}: sample_rate must be in (0, 1], got {sample_rate!r}.")
    if not (epochs > 0 and math.isfinite(epochs)):
        raise ValueError(f"{where}: epochs must be a finite number > 0, got {epochs!r}.")
    return int(epochs / sample_rate)


def _check_targets(target_epsilon: float, target_delta: float, epsilon_tolerance: float) -> None:
    if not 0 < target_delta < 1:
        raise ValueError(f"{_WHERE}: target_delta must be in (0, 1), got {target_delta!r}.")
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(
            f"{_WHERE}: target_epsilon must be finite and > 0, got {target_epsilon!r}."
        )
    if not epsilon_tolerance > 0:
        raise ValueError(f"{_WHERE}: epsilon_tolerance must be > 0, got {epsilon_tolerance!r}.")


def _resolve_steps(epochs: Optional[float], steps: Optional[int], sample_rate: float) -> int:
    """The number of steps from exactly one of ``epochs`` / ``steps``."""
    if (epochs is None) == (steps is None):
        raise ValueError(
            f"{_WHERE}: give exactly one of epochs or steps (got {epochs=}, {steps=})."
        )
    if not 0 < sample_rate <= 1:
        raise ValueError(f"{_WHERE}: sample_rate must be in (0, 1], got {sample_rate!r}.")
    if steps is None:
        if not (epochs > 0 and math.isfinite(epochs)):
            raise ValueError(f"{_WHERE}: epochs must be a finite number > 0, got {epochs!r}.")
        steps = steps_from_epochs(epochs, sample_rate)
    if int(steps) != steps or steps < 1:
        raise ValueError(
            f"{_WHERE}: steps must be an integer >= 1, got {steps!r} (epochs are converted as "
            "int(epochs / sample_rate))."
        )
    return int(steps)


def _epsilon_function(
    accountant: str, sample_rate: float, steps: int, target_delta: float, kwargs: dict
) -> Callable[[float], float]:
    """sigma -> epsilon of ``steps`` steps at (sigma, sample_rate), on one accountant."""
    acc = create_accountant(accountant)

    def epsilon(sigma: float) -> float:
        acc.history = [(sigma, sample_rate, steps)]
        return acc.get_epsilon(delta=target_delta, **kwargs)

    return epsilon


def _bracket(epsilon: Callable[[float], float], target_epsilon: float, accountant: str):
    """``(sigma_high, eps_high)`` with eps_high <= target: double sigma from SIGMA_START."""
    sigma_high, eps_high = SIGMA_START, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2.0
        eps_high = epsilon(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ValueError(
                f"{_WHERE}: target_epsilon={target_epsilon} is unreachable with the "
                f"{accountant!r} accountant: even noise_multiplier={sigma_high:g} gives "
                f"epsilon={eps_high:g}. Raise target_epsilon or target_delta, or use fewer "
                "steps / a smaller sample_rate."
            )
    return sigma_high, eps_high


def _bisect(
    epsilon: Callable[[float], float],
    target_epsilon: float,
    epsilon_tolerance: float,
    sigma_high: float,
    eps_high: float,
) -> float:
    """Bisection on [0, sigma_high] until eps(sigma_high) is within the tolerance below target.

    Stops early (returning sigma_high, still below the target) if the interval shrinks to
    adjacent floats, which only happens when eps(sigma) jumps over the tolerance band.
    """
    sigma_low = 0.0
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2.0
        if not sigma_low < sigma < sigma_high:
            break
        eps = epsilon(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


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
    """The noise multiplier sigma whose epsilon is in (target - tolerance, target].

    Give exactly one of ``epochs`` or ``steps``; epochs are converted as
    ``steps = int(epochs / sample_rate)`` (:func:`steps_from_epochs`). Extra ``kwargs`` go to the
    accountant's ``get_epsilon`` (e.g. ``eps_error`` for "prv").

    The search is Opacus 1.6's: double sigma from 10 (20, 40, ...) until eps(sigma) <= target,
    then bisect on [0, sigma] keeping the upper end, whose epsilon (as computed by the chosen
    accountant; for "prv" its certified upper bound) never exceeds the target. The result is a
    dyadic fraction of 20 (or of the power of two reached by the doubling).

    Raises:
        ValueError: invalid arguments, or a target that even ``MAX_SIGMA`` cannot reach.

    Args:
        target_epsilon: the ε to spend over the run.
        target_delta: the δ of the guarantee.
        sample_rate: the sampling probability of each step.
        epochs: the number of epochs (give this or ``steps``).
        steps: the number of steps (give this or ``epochs``).
        accountant: the accountant's registry name (``"rdp"``, ``"prv"``, ``"gdp"``).
        epsilon_tolerance: how far below the target ε the result may stay.

    Returns:
        the noise multiplier.
    """
    steps = _resolve_steps(epochs, steps, sample_rate)
    _check_targets(target_epsilon, target_delta, epsilon_tolerance)
    epsilon = _epsilon_function(accountant, sample_rate, steps, target_delta, kwargs)
    sigma_high, eps_high = _bracket(epsilon, target_epsilon, accountant)
    return _bisect(epsilon, target_epsilon, epsilon_tolerance, sigma_high, eps_high)

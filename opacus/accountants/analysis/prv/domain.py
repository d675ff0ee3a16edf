"""Uniform grids for discretised privacy random variables, and how wide they must be.

Gopi, Lee, Wutschitz 2021 ("Numerical Composition of Differential Privacy", GLW) truncate each
privacy random variable (PRV) to a window [-L, L], discretise it on a uniform grid and compose by
FFT. The half-width L comes from the RDP accountant (an upper bound on epsilon is a bound on the
upper tail of the PRV), as Opacus 1.6 does:

- L0 = RDP epsilon of the whole history at delta_error / 4,
- for each entry, the RDP epsilon of one step at delta_error / (8 K), K the total number of steps,
- L = max(L0, those, eps_error) + 3.
"""

import importlib
import math
import numbers
from typing import Sequence

import numpy as np

from opacus.accountants.analysis import rdp as rdp_analysis

# ``RDPAccountant`` is also importable from here (module __getattr__ below).
__all__ = ["Domain", "compute_safe_domain_size"]

# Margin added to the RDP tail bound, and the relative tolerance on an aligned grid's step.
_DOMAIN_MARGIN = 3.0
_DT_RTOL = 1e-8


def __getattr__(name: str):
    # Re-exported for interface compatibility; imported lazily to keep the maths package free of
    # the accountant classes (no import cycle).
    if name == "RDPAccountant":
        return importlib.import_module("opacus.accountants.rdp").RDPAccountant
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Domain:
    """The grid ``t_min, t_min + dt, ..., t_max`` of ``size`` points (``size`` even).

    ``shifts`` is the total non-grid offset applied with :meth:`shift_right` (the mean-preserving
    shift of GLW discretisation); for domains made by :meth:`create_aligned`, ``t_min - shifts``
    is a multiple of ``dt``, which is what lets FFT composition re-index results exactly.

    Args:
        t_min: the first grid point.
        t_max: the last grid point (> ``t_min``).
        size: the number of points (an even int >= 2).
        shifts: the total offset already applied by :meth:`shift_right`.

    Raises:
        TypeError: ``size`` is not an int.
        ValueError: ``size`` is odd or below 2, or ``t_min >= t_max``.
    """

    def __init__(self, t_min: float, t_max: float, size: int, shifts: float = 0.0) -> None:
        if isinstance(size, bool) or not isinstance(size, (numbers.Integral, np.integer)):
            raise TypeError(
                f"Domain: size must be an int, got {type(size).__name__} {size!r}; pass "
                "int(size), or build the grid with Domain.create_aligned(t_min, t_max, dt)."
            )
        if size < 2 or size % 2 != 0:
            raise ValueError(
                f"Domain: size must be even and >= 2 (FFT composition re-centres the grid by "
                f"half its length), got {size}; Domain.create_aligned rounds it up for you."
            )
        if not t_max > t_min:
            raise ValueError(f"Domain: need t_min < t_max, got t_min={t_min}, t_max={t_max}.")
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self.size = int(size)
        self.shifts = float(shifts)

    @classmethod
    def create_aligned(cls, t_min: float, t_max: float, dt: float) -> "Domain":
        """Grid of step ``dt`` covering [t_min, t_max] whose points are multiples of ``dt``.

        ``t_min`` is rounded down and ``t_max`` up to multiples of ``dt``; an odd number of points
        gets one more point on the right.

        Raises:
            ValueError: ``dt`` is not positive.
            RuntimeError: the resulting grid step differs from ``dt`` (relative 1e-8 or more).

        Args:
            t_min: the grid must reach down to this value.
            t_max: the grid must reach up to this value.
            dt: the grid step (> 0).

        Returns:
            the aligned grid.
        """
        if not dt > 0:
            raise ValueError(f"Domain.create_aligned: dt must be > 0, got {dt!r}.")
        t_min = math.floor(t_min / dt) * dt
        t_max = math.ceil(t_max / dt) * dt
        size = int(round((t_max - t_min) / dt)) + 1
        if size % 2 == 1:
            size += 1
            t_max += dt
        domain = cls(t_min, t_max, size)
        if not abs(domain.dt - dt) / dt < _DT_RTOL:
            raise RuntimeError(
                f"Domain.create_aligned: the grid step {domain.dt!r} differs from dt={dt!r}; "
                "the bounds are too large for this dt in floating point."
            )
        return domain

    @property
    def dt(self) -> float:
        """Grid step ``(t_max - t_min) / (size - 1)``."""
        return (self.t_max - self.t_min) / (self.size - 1)

    @property
    def ts(self) -> np.ndarray:
        """The ``size`` grid points ``t_min, t_min + dt, ..., t_max`` as a float64 array."""
        return np.linspace(self.t_min, self.t_max, self.size)

    def grid_offset(self) -> int:
        """Index of the aligned grid start: ``(t_min - shifts) / dt`` rounded."""
        return int(round((self.t_min - self.shifts) / self.dt))

    def shift_right(self, dt: float) -> "Domain":
        """The same grid moved right by ``dt`` (accumulated in ``shifts``).

        Args:
            dt: the offset to move the grid by.

        Returns:
            a new grid; this one is unchanged.
        """
        return Domain(self.t_min + dt, self.t_max + dt, self.size, self.shifts + dt)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (
            f"Domain(t_min={self.t_min}, t_max={self.t_max}, size={self.size}, "
            f"shifts={self.shifts})"
        )


def _rdp_epsilon(rdp_curves, counts, orders, delta: float) -> float:
    """RDP epsilon at ``delta`` of sum(count * curve), minimised over ``orders``."""
    total = sum(k * np.asarray(curve, dtype=np.float64) for k, curve in zip(counts, rdp_curves))
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


def compute_safe_domain_size(
    prvs, max_self_compositions: Sequence[int], eps_error: float, delta_error: float
) -> float:
    """Half-width L such that the PRVs and their composition live in [-L, L] (see module doc).

    ``prvs[i]`` is composed ``max_self_compositions[i]`` times and must have an ``rdp(orders)``
    method (its Rényi divergence per step). The RDP orders are ``RDPAccountant.DEFAULT_ALPHAS``.

    Args:
        prvs: the PRVs of the composed mechanisms (each with an ``rdp(alpha)`` method).
        max_self_compositions: how many times each PRV is composed.
        eps_error: the ε error allowed to the PRV accountant (> 0).
        delta_error: the δ error allowed to the PRV accountant, in (0, 1).

    Returns:
        the half-width L of the domain [-L, L].

    Raises:
        ValueError: the counts do not match the PRVs, are negative or sum to 0, or the errors are
            out of range.
    """
    if len(prvs) != len(max_self_compositions) or not prvs:
        raise ValueError(
            "compute_safe_domain_size: need one composition count per PRV (and at least one), "
            f"got {len(prvs)} PRVs and {len(max_self_compositions)} counts."
        )
    if not 0 < delta_error < 1 or not eps_error > 0:
        raise ValueError(
            "compute_safe_domain_size: need eps_error > 0 and delta_error in (0, 1), got "
            f"eps_error={eps_error!r}, delta_error={delta_error!r}."
        )
    counts = [int(k) for k in max_self_compositions]
    total = sum(counts)
    if total <= 0 or min(counts) < 0:
        raise ValueError(
            "compute_safe_domain_size: the counts must be >= 0 with a positive total, got "
            f"{counts}."
        )
    orders = importlib.import_module("opacus.accountants.rdp").RDPAccountant.DEFAULT_ALPHAS
    curves = [prv.rdp(orders) for prv in prvs]
    bound = _rdp_epsilon(curves, counts, orders, delta_error / 4.0)
    for curve in curves:
        bound = max(bound, _rdp_epsilon([curve], [1], orders, delta_error / (8.0 * total)))
    if not math.isfinite(bound):
        raise ValueError(
            "compute_safe_domain_size: the privacy loss is unbounded (infinite RDP); the PRV "
            "accountant cannot handle noise_multiplier = 0."
        )
    return max(bound, eps_error) + _DOMAIN_MARGIN

"""Uniform grids for discretised privacy random variables, and how large they must be.

Gopi, Lee, Wutschitz 2021 ("Numerical Composition of Differential Privacy", GLW) truncate each
privacy random variable (PRV) to a window [t_min, t_max], discretise it on a uniform grid and
compose by FFT. The window has to hold, with probability 1 - O(delta_error), both every single
PRV and their composition: we bound the tails with Chernoff bounds, the upper one from the RDP
curve (E[e^{(alpha-1) Y}] = e^{(alpha-1) RDP_alpha}) and the lower one from a bound on E[e^{-lam Y}]
(``log_mgf_negative_bound`` of the PRV, else the always-valid lam = 1 bound P(Y <= -t) <= e^{-t}).
"""

import importlib
import math
from typing import Sequence, Tuple

import numpy as np
from scipy.fft import next_fast_len

# ``RDPAccountant`` is also importable from here (module __getattr__ below).
__all__ = ["Domain", "compute_safe_domain_size", "compute_safe_domain_bounds"]

# Orders / exponents over which the Chernoff tail bounds are optimised.
_TAIL_ORDERS = np.array(
    [
        1.25,
        1.5,
        1.75,
        2,
        2.5,
        3,
        4,
        5,
        6,
        8,
        10,
        12,
        16,
        20,
        24,
        32,
        48,
        64,
        96,
        128,
        192,
        256,
        384,
        512,
        768,
        1024,
    ],
    dtype=np.float64,
)
_TAIL_LAMBDAS = np.concatenate([[0.25, 0.5, 0.75], _TAIL_ORDERS[4:] - 1.0])


def __getattr__(name: str):
    # Re-exported for interface compatibility; imported lazily to keep the maths package free of
    # the accountant classes (no import cycle).
    if name == "RDPAccountant":
        return importlib.import_module("opacus.accountants.rdp").RDPAccountant
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Domain:
    """The grid ``t_min, t_min + dt, ..., t_max`` (``size`` points).

    ``shifts`` is the total non-grid offset applied with :meth:`shift_right` (the mean-preserving
    shift of GLW discretisation); ``t_min - shifts`` stays a multiple of ``dt`` for domains made by
    :meth:`create_aligned`, which is what lets FFT composition re-index results exactly.
    """

    def __init__(self, t_min: float, t_max: float, size: int, shifts: float = 0.0) -> None:
        if not isinstance(size, (int, np.integer)) or size < 2:
            raise ValueError(f"Domain: size must be an integer >= 2, got {size!r}.")
        if not t_max > t_min:
            raise ValueError(f"Domain: need t_min < t_max, got t_min={t_min}, t_max={t_max}.")
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self.size = int(size)
        self.shifts = float(shifts)

    @classmethod
    def create_aligned(cls, t_min: float, t_max: float, dt: float) -> "Domain":
        """Smallest grid of step ``dt`` covering [t_min, t_max] whose points are multiples of dt.

        The size is rounded up to an FFT-friendly length (extending ``t_max``).
        """
        if not dt > 0:
            raise ValueError(f"Domain.create_aligned: dt must be > 0, got {dt!r}.")
        start = math.floor(t_min / dt)
        stop = math.ceil(t_max / dt)
        size = next_fast_len(max(stop - start + 1, 2), real=True)
        return cls(start * dt, (start + size - 1) * dt, size)

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
        """The same grid moved right by ``dt`` (accumulated in ``shifts``)."""
        return Domain(self.t_min + dt, self.t_max + dt, self.size, self.shifts + dt)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (
            f"Domain(t_min={self.t_min}, t_max={self.t_max}, size={self.size}, "
            f"shifts={self.shifts})"
        )


def _upper_tail(rdp: np.ndarray, log_inv_p: float) -> float:
    """Smallest t certified by Chernoff: P(Y >= t) <= e^{(alpha-1)(RDP_alpha - t)} <= p."""
    with np.errstate(invalid="ignore"):
        t = rdp + log_inv_p / (_TAIL_ORDERS - 1.0)
    return float(np.nanmin(t))


def _lower_tail(log_mgf_neg: np.ndarray, log_inv_p: float) -> float:
    """Smallest t with P(Y <= -t) <= e^{log E[e^{-lam Y}] - lam t} <= p."""
    with np.errstate(invalid="ignore"):
        t = (log_mgf_neg + log_inv_p) / _TAIL_LAMBDAS
    return float(np.nanmin(t))


def _log_mgf_negative(prv) -> np.ndarray:
    if hasattr(prv, "log_mgf_negative_bound"):
        return np.asarray(prv.log_mgf_negative_bound(_TAIL_LAMBDAS), dtype=np.float64)
    # Generic bound: E_Q[(P/Q)^lam] <= 1 for lam <= 1; nothing for lam > 1.
    return np.where(_TAIL_LAMBDAS <= 1.0, 0.0, np.inf)


def compute_safe_domain_bounds(
    prvs, max_self_compositions: Sequence[int], eps_error: float, delta_error: float
) -> Tuple[float, float]:
    """Window ``(t_min, t_max)`` holding every single PRV and the composition.

    Budget (GLW Sec 5, re-derived): each of the K = sum(max_self_compositions) single PRVs leaves
    the window with probability <= delta_error / (8 K) (total delta_error / 8), and the
    composition (widened by eps_error for the discretisation error) leaves it on either side with
    probability <= delta_error / 8.
    """
    if len(prvs) != len(max_self_compositions):
        raise ValueError(
            "compute_safe_domain_bounds: need one composition count per PRV, got "
            f"{len(prvs)} PRVs and {len(max_self_compositions)} counts."
        )
    if not 0 < delta_error < 1 or not eps_error > 0:
        raise ValueError(
            "compute_safe_domain_bounds: need eps_error > 0 and delta_error in (0, 1), got "
            f"eps_error={eps_error!r}, delta_error={delta_error!r}."
        )
    total = int(sum(max_self_compositions))
    if total <= 0:
        raise ValueError("compute_safe_domain_bounds: the total number of compositions is 0.")
    log_inv_single = math.log(8.0 * total / delta_error)
    log_inv_composed = math.log(8.0 / delta_error)

    rdps = [np.asarray(prv.rdp(_TAIL_ORDERS), dtype=np.float64) for prv in prvs]
    mgfs = [_log_mgf_negative(prv) for prv in prvs]
    with np.errstate(invalid="ignore"):
        rdp_total = sum(k * r for k, r in zip(max_self_compositions, rdps))
        mgf_total = sum(k * m for k, m in zip(max_self_compositions, mgfs))

    t_max = _upper_tail(rdp_total, log_inv_composed) + eps_error
    t_min = -_lower_tail(mgf_total, log_inv_composed) - eps_error
    for prv, rdp, mgf in zip(prvs, rdps, mgfs):
        t_max = max(t_max, _upper_tail(rdp, log_inv_single))
        support_min = getattr(prv, "support_min", -math.inf)
        t_min = min(t_min, max(support_min, -_lower_tail(mgf, log_inv_single)))
    if not (math.isfinite(t_min) and math.isfinite(t_max)):
        raise ValueError(
            "compute_safe_domain_bounds: the privacy loss is unbounded (infinite RDP); the PRV "
            "accountant cannot handle noise_multiplier = 0."
        )
    return t_min, t_max


def compute_safe_domain_size(
    prvs, max_self_compositions: Sequence[int], eps_error: float, delta_error: float
) -> float:
    """Half-width L such that [-L, L] is a safe window (see :func:`compute_safe_domain_bounds`)."""
    t_min, t_max = compute_safe_domain_bounds(prvs, max_self_compositions, eps_error, delta_error)
    return max(-t_min, t_max)

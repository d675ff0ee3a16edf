"""Composition of discrete PRVs by FFT (Gopi, Lee, Wutschitz 2021).

Independent PRVs add, so the composed pmf is the convolution of the pmfs. On a grid of N points
the FFT turns k self-compositions into the k-th power of the transform (computed by repeated
squaring), and the convolution is circular: a composed value is only known modulo N * dt, which is
why the window has to hold the composed PRV with high probability (see ``domain.py``). Values on
aligned grids are multiples of dt plus the tracked mean-preserving ``shifts``, so the result is
re-indexed exactly by an integer roll.
"""

from typing import List

import numpy as np
from scipy import fft

from opacus.accountants.analysis.prv.domain import Domain
from opacus.accountants.analysis.prv.prvs import DiscretePRV

__all__ = ["compose_heterogeneous", "DiscretePRV"]


def _power(values: np.ndarray, exponent: int) -> np.ndarray:
    """values ** exponent for complex arrays by repeated squaring (exact for integer exponents,
    relative rounding error growing only like exponent * machine epsilon)."""
    result = None
    base = values.copy()
    while exponent:
        if exponent & 1:
            if result is None:
                result = base.copy()
            else:
                np.multiply(result, base, out=result)
        exponent >>= 1
        if exponent:
            np.multiply(base, base, out=base)
    return result


def compose_heterogeneous(
    dprvs: List[DiscretePRV], num_self_compositions: List[int]
) -> DiscretePRV:
    """The PRV of dprvs[0] composed num_self_compositions[0] times with dprvs[1] ... .

    All ``dprvs`` must live on grids with the same size and step, aligned to multiples of the
    step (``Domain.create_aligned``); the result lives on the window of ``dprvs[0]``.
    """
    if len(dprvs) != len(num_self_compositions) or not dprvs:
        raise ValueError(
            "compose_heterogeneous: need one composition count per DiscretePRV (and at least "
            f"one), got {len(dprvs)} PRVs and {len(num_self_compositions)} counts."
        )
    counts = [int(k) for k in num_self_compositions]
    if any(k < 0 for k in counts) or sum(counts) == 0:
        raise ValueError(
            f"compose_heterogeneous: counts must be >= 0 with a positive total, got {counts}."
        )
    size = len(dprvs[0])
    dt = dprvs[0].domain.dt
    for dprv in dprvs[1:]:
        if len(dprv) != size or not np.isclose(dprv.domain.dt, dt, rtol=1e-9, atol=0.0):
            raise ValueError(
                "compose_heterogeneous: every DiscretePRV must be on a grid with the same size "
                "and step; build them with discretize(..., one Domain)."
            )

    transform = None
    offset = 0  # sum of k_i * (aligned start index of grid i)
    shifts = 0.0
    for dprv, k in zip(dprvs, counts):
        if k == 0:
            continue
        power = _power(fft.rfft(dprv.pmf, workers=-1), k)
        transform = power if transform is None else transform * power
        offset += k * dprv.domain.grid_offset()
        shifts += k * dprv.domain.shifts
    pmf = fft.irfft(transform, n=size, workers=-1)
    # Composed value at index j is (offset + j) * dt + shifts (mod size * dt); re-index onto the
    # window that starts at the first grid's aligned start.
    start = dprvs[0].domain.grid_offset()
    pmf = np.roll(pmf, (offset - start) % size)
    np.maximum(pmf, 0.0, out=pmf)  # FFT round-off leaves tiny negative masses
    t_min = start * dt + shifts
    domain = Domain(t_min, t_min + (size - 1) * dt, size, shifts=shifts)
    return DiscretePRV(pmf=pmf, domain=domain)

"""Composition of discrete PRVs by FFT (Gopi, Lee, Wutschitz 2021).

Independent PRVs add, so the composed pmf is the convolution of the pmfs. On a grid of N points
the FFT turns k self-compositions into the k-th power of the transform (computed by repeated
squaring), and the convolution is circular (as in Opacus 1.6): a composed value is only known
modulo N * dt, which is why the window has to hold the composed PRV with high probability (see
``domain.py``). Values on aligned grids are multiples of dt plus the tracked mean-preserving
``shifts``, so the result is re-indexed exactly by an integer roll. Different PRVs are then
combined pairwise by linear convolution cropped to the window.
"""

from typing import List

import numpy as np
from scipy import fft, signal

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


def _check_compatible(dprvs: List[DiscretePRV], counts: List[int]) -> None:
    if len(dprvs) != len(counts) or not dprvs:
        raise ValueError(
            "compose_heterogeneous: need one composition count per DiscretePRV (and at least "
            f"one), got {len(dprvs)} PRVs and {len(counts)} counts."
        )
    if any(k < 1 for k in counts):
        raise ValueError(f"compose_heterogeneous: counts must be >= 1, got {counts}.")
    size = len(dprvs[0])
    dt = dprvs[0].domain.dt
    for dprv in dprvs:
        if len(dprv) % 2 != 0:
            raise ValueError(
                f"compose_heterogeneous: the pmf has odd length {len(dprv)}; composition needs "
                "an even grid (Domain.create_aligned makes one)."
            )
        if len(dprv) != size or not np.isclose(dprv.domain.dt, dt, rtol=1e-9, atol=0.0):
            raise ValueError(
                "compose_heterogeneous: every DiscretePRV must be on a grid with the same size "
                "and step; build them with discretize(..., one Domain)."
            )


def _self_compose(dprv: DiscretePRV, k: int) -> DiscretePRV:
    """``dprv`` composed with itself ``k`` times, on the same grid (shifted by the k - 1 extra
    mean shifts), as the circular convolution over the N grid points.

    The sum of k grid values is (k o + s) dt, o being the grid's aligned start index and s the
    sum of the k indices, so grid point j holds s = j - (k - 1) o (mod N): a roll right by
    (k - 1) o, which for the centred grids of the accountant (o = 1 - N / 2) is k - 1, plus N / 2
    when k is even.

    N need not be FFT-friendly (it is not padded): the transform is taken at the next fast
    length M >= N, which yields the k-fold sum modulo M; the M values nearest the window are then
    folded modulo N. That is the length-N circular convolution exactly for every sum within
    (M - N) / 2 grid points of the window; sums further out (whose mass the window size makes
    negligible) alias modulo M instead of N.
    """
    size = len(dprv)
    fast = fft.next_fast_len(size, real=True)
    wrapped = fft.irfft(_power(fft.rfft(dprv.pmf, n=fast), k), n=fast)
    margin = (fast - size) // 2
    # seg[i] is the mass of the sum s = w0 - margin + i (w0 = -(k - 1) o, the window's start).
    start = (-(k - 1) * dprv.domain.grid_offset() - margin) % fast
    seg = np.roll(wrapped, -start)
    pmf = seg[margin : margin + size].copy()
    pmf[size - margin :] += seg[:margin]
    pmf[: fast - size - margin] += seg[margin + size :]
    return DiscretePRV(pmf=pmf, domain=dprv.domain.shift_right(dprv.domain.shifts * (k - 1)))


def _compose_pair(left: DiscretePRV, right: DiscretePRV) -> DiscretePRV:
    """Linear convolution of two PRVs, cropped to ``left``'s grid (mass outside is dropped).

    Full-convolution index s holds the value (o_l + o_r + s) dt + shifts, so grid point j of the
    left domain is s = j - o_r; for centred grids that is the central entries N/2 - 1 ... 3N/2 - 2.
    """
    size = len(left)
    full = signal.fftconvolve(left.pmf, right.pmf, mode="full")
    start = -right.domain.grid_offset()
    pmf = np.zeros(size)
    lo, hi = max(start, 0), min(start + size, len(full))
    if hi > lo:
        pmf[lo - start : hi - start] = full[lo:hi]
    return DiscretePRV(pmf=pmf, domain=left.domain.shift_right(right.domain.shifts))


def compose_heterogeneous(
    dprvs: List[DiscretePRV], num_self_compositions: List[int]
) -> DiscretePRV:
    """The PRV of dprvs[0] composed num_self_compositions[0] times with dprvs[1] ... .

    All ``dprvs`` must live on grids with the same even size and step, aligned to multiples of
    the step (``Domain.create_aligned``). Each one is first composed with itself by FFT (circular
    convolution); the results are then combined pairwise in rounds (linear convolution cropped
    to the grid), an odd one out being carried over to the front of the next round.

    Raises:
        ValueError: mismatched lengths, counts below 1, odd or different grid sizes.

    Args:
        dprvs: the discrete PRVs, on aligned grids of the same even size and step.
        num_self_compositions: how many times each PRV is composed with itself (>= 1).

    Returns:
        the discrete PRV of the whole composition.
    """
    counts = [int(k) for k in num_self_compositions]
    _check_compatible(dprvs, counts)
    composed = [_self_compose(dprv, k) for dprv, k in zip(dprvs, counts)]
    while len(composed) > 1:
        carried = [composed.pop()] if len(composed) % 2 == 1 else []
        composed = carried + [
            _compose_pair(composed[i], composed[i + 1]) for i in range(0, len(composed), 2)
        ]
    return composed[0]

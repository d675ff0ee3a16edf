"""Privacy random variables (PRVs) of the Poisson-subsampled Gaussian, and their discretisation.

Gopi, Lee, Wutschitz 2021 (GLW): for a mechanism whose output distributions on neighbouring
datasets are Q (with the example) and P (without), the PRV is Y = log(Q(w) / P(w)) with w ~ Q.
Composition adds independent PRVs, and delta(eps) = E[(1 - e^{eps - Y})_+].

Poisson-subsampled Gaussian with sampling rate q and noise multiplier sigma (the "remove"
direction, as for the RDP of Mironov, Talwar, Zhang 2019): P = N(0, sigma^2),
Q = (1 - q) N(0, sigma^2) + q N(1, sigma^2), so Y = log(1 - q + q e^{(2w - 1) / (2 sigma^2)}), an
increasing function of w, with inverse w(t) = sigma^2 log((e^t - 1 + q) / q) + 1/2 on
t > log(1 - q). Its CDF is therefore (1 - q) Phi(w(t) / sigma) + q Phi((w(t) - 1) / sigma).
"""

import math
import warnings
from typing import Tuple

import numpy as np
from scipy import integrate
from scipy.special import ndtr

from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv.domain import Domain

__all__ = [
    "PoissonSubsampledGaussianPRV",
    "TruncatedPrivacyRandomVariable",
    "DiscretePRV",
    "discretize",
    "Domain",
]

_SQRT_2PI = math.sqrt(2.0 * math.pi)


class PoissonSubsampledGaussianPRV:
    """PRV of one step of the Poisson-subsampled Gaussian mechanism.

    Args:
        sample_rate: the Poisson sampling probability q, in (0, 1].
        noise_multiplier: sigma (> 0).

    Raises:
        ValueError: ``sample_rate`` is not in (0, 1] or ``noise_multiplier`` is not positive.
    """

    def __init__(self, sample_rate: float, noise_multiplier: float) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(
                "PoissonSubsampledGaussianPRV: sample_rate must be in (0, 1], got "
                f"{sample_rate!r} (a step with sample_rate 0 releases nothing: skip it)."
            )
        if not noise_multiplier > 0:
            raise ValueError(
                "PoissonSubsampledGaussianPRV: noise_multiplier must be > 0, got "
                f"{noise_multiplier!r} (sigma = 0 has an unbounded privacy loss)."
            )
        self.sample_rate = float(sample_rate)
        self.noise_multiplier = float(noise_multiplier)

    @property
    def support_min(self) -> float:
        """Y >= log(1 - q): the likelihood ratio is at least 1 - q."""
        return math.log1p(-self.sample_rate) if self.sample_rate < 1 else -math.inf

    def _w(self, t) -> np.ndarray:
        """Inverse of Y(w): the Gaussian-space point with privacy loss t (-inf below support)."""
        q, s = self.sample_rate, self.noise_multiplier
        t = np.asarray(t, dtype=np.float64)
        scalar = t.ndim == 0
        t = np.atleast_1d(t)
        # log(e^t - 1 + q): for t > 0 as t + log1p(-(1 - q) e^{-t}) (no overflow), for t <= 0 as
        # log(expm1(t) + q) (no cancellation); only the branch each point needs is evaluated.
        log_num = np.empty_like(t)
        positive = t > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            tp = t[positive]
            log_num[positive] = tp + np.log1p(-(1.0 - q) * np.exp(-tp))
            log_num[~positive] = np.log(np.expm1(t[~positive]) + q)
        w = s * s * (log_num - math.log(q)) + 0.5
        w[~(t > self.support_min)] = -np.inf
        return w[0] if scalar else w

    def _mixture_density(self, w) -> np.ndarray:
        q, s = self.sample_rate, self.noise_multiplier
        w = np.asarray(w, dtype=np.float64)
        return (
            (1.0 - q) * np.exp(-0.5 * (w / s) ** 2) + q * np.exp(-0.5 * ((w - 1.0) / s) ** 2)
        ) / (s * _SQRT_2PI)

    def cdf(self, t):
        """P(Y <= t).

        Args:
            t: a privacy loss value, or an array of them.
        """
        q, s = self.sample_rate, self.noise_multiplier
        w = self._w(t)
        return (1.0 - q) * ndtr(w / s) + q * ndtr((w - 1.0) / s)

    def sf(self, t):
        """P(Y > t), accurate in the upper tail where 1 - cdf would cancel."""
        q, s = self.sample_rate, self.noise_multiplier
        w = self._w(t)
        return (1.0 - q) * ndtr(-w / s) + q * ndtr((1.0 - w) / s)

    def interval_masses(self, edges) -> np.ndarray:
        """P(edges[j] < Y <= edges[j + 1]) for increasing ``edges``.

        CDF differences below w = 1/2 and survival-function differences above it, so the masses
        in the upper tail (which decide delta) keep full relative precision.
        """
        q, s = self.sample_rate, self.noise_multiplier
        edges = np.asarray(edges, dtype=np.float64)
        # Bins below the support (Y >= log(1 - q)) are empty: skip them.
        first = max(int(np.searchsorted(edges, self.support_min, side="right")) - 1, 0)
        if first > 0:
            masses = np.zeros(len(edges) - 1)
            if first < len(edges) - 1:
                masses[first:] = self.interval_masses(edges[first:])
            return masses
        w = self._w(edges)
        split = int(np.searchsorted(w, 0.5))
        w_low, w_up = w[:split], w[split:]
        cdf_low = (1.0 - q) * ndtr(w_low / s) + q * ndtr((w_low - 1.0) / s)
        sf_up = (1.0 - q) * ndtr(-w_up / s) + q * ndtr((1.0 - w_up) / s)
        masses = np.empty(len(w) - 1)
        if split > 1:
            masses[: split - 1] = np.diff(cdf_low)
        if split < len(w) - 1:
            masses[split:] = sf_up[:-1] - sf_up[1:]
        if 0 < split < len(w):
            masses[split - 1] = (1.0 - sf_up[0]) - cdf_low[-1]
        return np.maximum(masses, 0.0)

    def pdf(self, t):
        """Density of Y: the mixture density at w(t) times dw/dt = sigma^2 / (1 - (1-q) e^{-t}).

        Args:
            t: a privacy loss value, or an array of them.
        """
        q, s = self.sample_rate, self.noise_multiplier
        t = np.asarray(t, dtype=np.float64)
        w = self._w(t)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            dw_dt = s * s / (-np.expm1(-t) + q * np.exp(-t))
            density = self._mixture_density(w) * dw_dt
        return np.where(t > self.support_min, density, 0.0)

    def rdp(self, alpha):
        """RDP D_alpha(Q || P) of one step (Mironov, Talwar, Zhang 2019).

        Args:
            alpha: the Rényi order (> 1), or an array of orders.

        Returns:
            the Rényi divergence of one step at each order.
        """
        return rdp_analysis.compute_rdp(
            q=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=1, orders=alpha
        )

    def expectation_between(self, t_min: float, t_max: float) -> float:
        """E[Y 1{t_min < Y <= t_max}], integrated in Gaussian space where Y is smooth."""
        s = self.noise_multiplier
        lo = float(self._w(t_min))
        hi = float(self._w(t_max))
        # Beyond 40 sigma from both mixture centres the density is below e^{-800}.
        lo, hi = max(lo, -40.0 * s), min(hi, 1.0 + 40.0 * s)
        if hi <= lo:
            return 0.0
        breaks = (
            [lo]
            + [b for b in (-8 * s, -2 * s, 0.0, 0.5, 1.0, 1 + 2 * s, 1 + 8 * s) if lo < b < hi]
            + [hi]
        )

        q = self.sample_rate
        log_1mq = math.log1p(-q) if q < 1 else -math.inf
        log_q = math.log(q)
        norm = 1.0 / (s * _SQRT_2PI)

        def integrand(w: float) -> float:
            # Scalar twin of _y * _mixture_density (quad calls it hundreds of times).
            u = (2.0 * w - 1.0) / (2.0 * s * s)
            if q == 1.0:
                y = u
            elif u < 30.0:
                y = math.log1p(q * math.expm1(u))
            else:
                y = max(log_1mq, log_q + u) + math.log1p(math.exp(-abs(log_1mq - log_q - u)))
            density = (1.0 - q) * math.exp(-0.5 * (w / s) ** 2) + q * math.exp(
                -0.5 * ((w - 1.0) / s) ** 2
            )
            return y * density * norm

        total = 0.0
        with warnings.catch_warnings():
            # quad warns when round-off stops it short of epsrel=1e-13; what K steps need is
            # K * error << eps_error, met by many orders of magnitude even then.
            warnings.simplefilter("ignore", integrate.IntegrationWarning)
            for a, b in zip(breaks[:-1], breaks[1:]):
                value, _ = integrate.quad(integrand, a, b, epsabs=0.0, epsrel=1e-13, limit=200)
                total += value
        return total


class TruncatedPrivacyRandomVariable:
    """A PRV conditioned on t_min <= Y <= t_max (GLW truncation).

    Args:
        prv: the untruncated PRV.
        t_min: the lower end of the window.
        t_max: the upper end of the window (> ``t_min``).

    Raises:
        ValueError: ``t_min >= t_max`` or the window holds no probability mass.
    """

    def __init__(self, prv: PoissonSubsampledGaussianPRV, t_min: float, t_max: float) -> None:
        if not t_max > t_min:
            raise ValueError(
                f"TruncatedPrivacyRandomVariable: need t_min < t_max, got {t_min}, {t_max}."
            )
        self.prv = prv
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self._cdf_min = float(prv.cdf(self.t_min))
        self._sf_max = float(prv.sf(self.t_max)) if hasattr(prv, "sf") else 1 - prv.cdf(t_max)
        self.remaining_mass = 1.0 - self._cdf_min - self._sf_max
        if not self.remaining_mass > 0:
            raise ValueError(
                "TruncatedPrivacyRandomVariable: the window holds no probability mass."
            )

    def pdf(self, t):
        """Density of the truncated PRV at ``t`` (scalar or array; same shape returned).

        The untruncated density divided by the mass kept in ``[t_min, t_max]``; 0 outside it.

        Args:
            t: a privacy loss value, or an array of them.
        """
        t = np.asarray(t, dtype=np.float64)
        inside = (t >= self.t_min) & (t <= self.t_max)
        return np.where(inside, self.prv.pdf(t) / self.remaining_mass, 0.0)

    def cdf(self, t):
        """P(Y <= t | t_min <= Y <= t_max): 0 below ``t_min``, 1 from ``t_max`` on (elementwise).

        Args:
            t: a privacy loss value, or an array of them.
        """
        t = np.asarray(t, dtype=np.float64)
        value = (self.prv.cdf(t) - self._cdf_min) / self.remaining_mass
        return np.where(t < self.t_min, 0.0, np.where(t >= self.t_max, 1.0, value))

    def sf(self, t):
        """P(Y > t | t_min <= Y <= t_max), elementwise; 1 below ``t_min``, 0 from ``t_max`` on.

        Computed from the underlying PRV's survival function when it has one, so that small
        upper-tail probabilities keep their relative precision.
        """
        t = np.asarray(t, dtype=np.float64)
        if hasattr(self.prv, "sf"):
            value = (self.prv.sf(t) - self._sf_max) / self.remaining_mass
        else:
            value = 1.0 - (self.prv.cdf(t) - self._cdf_min) / self.remaining_mass
        return np.where(t < self.t_min, 1.0, np.where(t >= self.t_max, 0.0, value))

    def interval_masses(self, edges) -> np.ndarray:
        """P(edges[j] < Y <= edges[j + 1] | window) for increasing edges inside the window."""
        edges = np.clip(np.asarray(edges, dtype=np.float64), self.t_min, self.t_max)
        if hasattr(self.prv, "interval_masses"):
            masses = self.prv.interval_masses(edges)
        else:
            masses = np.maximum(np.diff(self.prv.cdf(edges)), 0.0)
        return masses / self.remaining_mass

    def mean(self) -> float:
        """E[Y | t_min <= Y <= t_max].

        Returns:
            the mean of the truncated PRV.
        """
        if hasattr(self.prv, "expectation_between"):
            inner = self.prv.expectation_between(self.t_min, self.t_max)
        else:
            inner, _ = integrate.quad(
                lambda t: t * float(self.prv.pdf(t)), self.t_min, self.t_max, limit=500
            )
        return inner / self.remaining_mass


def discretize(prv, domain: Domain) -> "DiscretePRV":
    """Mean-preserving discretisation of ``prv`` on ``domain`` (GLW Alg 1).

    Grid point t_j receives the mass P(t_j - dt/2 < Y <= t_j + dt/2) (``prv`` is normally
    truncated to the domain's [t_min, t_max], so the end points take the half bins and the total
    is 1). The grid is then shifted right by E[Y] - sum_j p_j t_j so the discrete PRV has the
    mean of ``prv``; that keeps the rounding errors of independent steps zero-mean, so their sum
    concentrates. The shift is stored in the returned domain's ``shifts``.

    Raises:
        RuntimeError: the shift is dt/2 or more (``prv`` has mass far outside ``domain``).

    Args:
        prv: the PRV to discretise (normally truncated to the domain).
        domain: the grid to put its mass on.

    Returns:
        the discrete PRV.
    """
    ts = domain.ts
    dt = domain.dt
    edges = np.concatenate([ts - dt / 2.0, [ts[-1] + dt / 2.0]])
    if hasattr(prv, "interval_masses"):
        pmf = prv.interval_masses(edges)
    else:
        pmf = np.diff(prv.cdf(edges))
    mean_shift = float(prv.mean()) - float(np.dot(pmf, ts))
    if not abs(mean_shift) < dt / 2.0:
        raise RuntimeError(
            f"discretize: the mean-preserving shift {mean_shift} is not below half the grid step "
            f"{dt}; truncate the PRV to the domain first (TruncatedPrivacyRandomVariable)."
        )
    return DiscretePRV(pmf=pmf, domain=domain.shift_right(mean_shift))


class DiscretePRV:
    """A PRV supported on the points of ``domain`` with probabilities ``pmf``.

    Args:
        pmf: the probability of each grid point (non-negative, same length as ``domain``).
        domain: the grid the PRV lives on.

    Raises:
        ValueError: ``pmf`` is not 1-d with one entry per point of ``domain``.
    """

    def __init__(self, pmf: np.ndarray, domain: Domain) -> None:
        pmf = np.asarray(pmf, dtype=np.float64)
        if pmf.ndim != 1 or len(pmf) != len(domain):
            raise ValueError(
                f"DiscretePRV: pmf must be 1-d with one entry per domain point ({len(domain)}), "
                f"got shape {pmf.shape}."
            )
        self.pmf = pmf
        self.domain = domain
        self._tails = None  # tail sums for eps(delta), built on first use

    def __len__(self) -> int:
        return len(self.pmf)

    def compute_delta_estimate(self, eps: float) -> float:
        """delta(eps) = E[(1 - e^{eps - Y})_+] of the discrete PRV.

        Args:
            eps: the ε at which δ is estimated.

        Returns:
            the δ of the discrete PRV at ``eps``.
        """
        ts = self.domain.ts
        above = ts > eps
        return float(np.sum(self.pmf[above] * -np.expm1(eps - ts[above])))

    def _tail_sums(self) -> Tuple[int, float, np.ndarray, np.ndarray, np.ndarray]:
        """``(start, c, A, B, D)`` for the grid indices i >= start: A_i = sum_{j>=i} p_j,
        B_i = sum_{j>=i} p_j e^{c - t_j} and D_i = e^{t_i - c} B_i - A_i = -delta(t_i),
        accumulated from the far tail inwards.

        ``start`` is the last index with t <= 0 (epsilon is never negative, so the sums further
        left are not needed). The scale c = max(0, t_max - 700) keeps e^{c - t} from underflowing
        on grids reaching beyond t = 700 (it is 0 otherwise).
        """
        if self._tails is None:
            ts = self.domain.ts
            start = max(int(np.searchsorted(ts, 0.0, side="right")) - 1, 0)
            ts, pmf = ts[start:], self.pmf[start:]
            scale = max(0.0, float(ts[-1]) - 700.0)
            tail_a = np.cumsum(pmf[::-1])[::-1]
            with np.errstate(over="ignore", invalid="ignore"):
                # Beyond ~1400 units below t_max e^{c - t} overflows: those points (far below
                # any epsilon the grid resolves) get NaN sums and are never selected.
                tail_b = np.cumsum((pmf * np.exp(scale - ts))[::-1])[::-1]
                minus_delta = np.exp(ts - scale) * tail_b - tail_a
            self._tails = (start, scale, tail_a, tail_b, minus_delta)
        return self._tails

    def _epsilon_for_delta(self, delta: float) -> float:
        """Smallest eps >= 0 with delta(eps) <= delta.

        For eps in [t_{i-1}, t_i), delta(eps) = A_i - e^eps B_i; the first index i with
        delta(t_i) = A_i - e^{t_i} B_i <= delta brackets the solution, which is then
        ln((A_i - delta) / B_i) (0 when that index has t_i <= 0).
        """
        start, scale, tail_a, tail_b, minus_delta = self._tail_sums()
        # Points whose scaled sums overflowed (inf or NaN, far below t_max) never qualify: an
        # infinite minus_delta would otherwise pass the test and bracket epsilon far too low.
        with np.errstate(invalid="ignore"):
            qualifies = np.isfinite(minus_delta) & (minus_delta >= -delta)
        i = int(np.argmax(qualifies))  # the last index qualifies: delta(t_max) = 0
        t_i = self.domain.t_min + (start + i) * self.domain.dt
        if i == 0:
            if t_i <= 0:
                return 0.0  # delta(0) <= delta already
            raise RuntimeError(
                "DiscretePRV: epsilon lies below the first grid point; the domain is too narrow."
            )
        if not (math.isfinite(tail_b[i]) and tail_b[i] > 0 and tail_a[i] > delta):
            return t_i  # e^{-t} under- or overflowed: eps <= t_i, the end of its bracket
        # In logs: the quotient itself can underflow to 0.
        return max(math.log(tail_a[i] - delta) - math.log(tail_b[i]) + scale, 0.0)

    def compute_epsilon(
        self, delta: float, delta_error: float, eps_error: float
    ) -> Tuple[float, float, float]:
        """``(lower, estimate, upper)`` bounds on the true epsilon at ``delta`` (GLW Thm 5.5).

        upper = eps_disc(delta - delta_error) + eps_error, estimate = eps_disc(delta),
        lower = eps_disc(delta + delta_error) - eps_error (not below 0). ``delta <= 0`` gives
        ``(inf, inf, inf)``.

        Raises:
            ValueError: ``delta_error`` is not in (0, delta), or the floating point error of the
                ``len(pmf)`` masses (long double machine epsilon times the size) exceeds
                ``delta - delta_error``.

        Args:
            delta: the target δ.
            delta_error: the δ error of the discretisation, in (0, delta).
            eps_error: the ε error of the discretisation.

        Returns:
            ``(lower, estimate, upper)`` bounds on ε.
        """
        if delta <= 0:
            return math.inf, math.inf, math.inf
        if not 0 < delta_error < delta:
            raise ValueError(
                f"DiscretePRV.compute_epsilon: need 0 < delta_error < delta, got "
                f"delta_error={delta_error!r}, delta={delta!r}."
            )
        if np.finfo(np.longdouble).eps * len(self) > delta - delta_error:
            raise ValueError(
                f"DiscretePRV.compute_epsilon: delta - delta_error = {delta - delta_error!r} is "
                f"below the floating point error of a {len(self)}-point grid; use a larger "
                "delta (or a coarser eps_error)."
            )
        estimate = self._epsilon_for_delta(delta)
        upper = self._epsilon_for_delta(delta - delta_error) + eps_error
        lower = max(self._epsilon_for_delta(delta + delta_error) - eps_error, 0.0)
        return lower, estimate, upper

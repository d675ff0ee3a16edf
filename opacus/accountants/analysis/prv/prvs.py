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
    """PRV of one step of the Poisson-subsampled Gaussian mechanism."""

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

    def _y(self, w) -> np.ndarray:
        """Y as a function of the Gaussian-space point w."""
        q, s = self.sample_rate, self.noise_multiplier
        u = (2.0 * np.asarray(w, dtype=np.float64) - 1.0) / (2.0 * s * s)
        if q == 1:
            return u
        with np.errstate(over="ignore"):
            small = np.log1p(q * np.expm1(np.minimum(u, 30.0)))
        large = np.logaddexp(math.log1p(-q), math.log(q) + u)
        return np.where(u < 30.0, small, large)

    def _mixture_density(self, w) -> np.ndarray:
        q, s = self.sample_rate, self.noise_multiplier
        w = np.asarray(w, dtype=np.float64)
        return (
            (1.0 - q) * np.exp(-0.5 * (w / s) ** 2) + q * np.exp(-0.5 * ((w - 1.0) / s) ** 2)
        ) / (s * _SQRT_2PI)

    def cdf(self, t):
        """P(Y <= t)."""
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
        """Density of Y: the mixture density at w(t) times dw/dt = sigma^2 / (1 - (1-q) e^{-t})."""
        q, s = self.sample_rate, self.noise_multiplier
        t = np.asarray(t, dtype=np.float64)
        w = self._w(t)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            dw_dt = s * s / (-np.expm1(-t) + q * np.exp(-t))
            density = self._mixture_density(w) * dw_dt
        return np.where(t > self.support_min, density, 0.0)

    def rdp(self, alpha):
        """RDP D_alpha(Q || P) of one step (Mironov, Talwar, Zhang 2019)."""
        return rdp_analysis.compute_rdp(
            q=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=1, orders=alpha
        )

    def log_mgf_negative_bound(self, lam) -> np.ndarray:
        """Upper bound on log E[e^{-lam Y}] = log E_P[(P/Q)^{lam - 1}], for lam > 0.

        lam <= 1: at most 0 (Jensen). lam = 1 + b > 1, writing Q/P = 1 + x, x = q (R - 1) with
        R = N(1, s^2)/N(0, s^2), E_P[x] = 0, E_P[x^2] = q^2 (e^{1/s^2} - 1):
        - convexity of y -> y^{-b}: (1 - q + q R)^{-b} <= 1 - q + q R^{-b}, and
          E_P[R^{-b}] = e^{b (b + 1) / (2 s^2)} (Gaussian Rényi divergence);
        - Taylor with Lagrange remainder ((1 + x)^{-b} has a negative third derivative, and
          x >= -q): E[(1 + x)^{-b}] <= 1 + b (b+1)/2 E[x^2] + b (b+1)(b+2)/6 q^3 (1-q)^{-(b+3)}.
        For q = 1, Y ~ N(1/(2 s^2), 1/s^2) and the value lam (lam - 1) / (2 s^2) is exact.
        """
        q, s = self.sample_rate, self.noise_multiplier
        lam = np.asarray(lam, dtype=np.float64)
        if q == 1:
            return lam * (lam - 1.0) / (2.0 * s * s)
        b = np.maximum(lam - 1.0, 0.0)
        with np.errstate(over="ignore", invalid="ignore"):
            convex = np.log1p(q * np.expm1(b * (b + 1.0) / (2.0 * s * s)))
            taylor = np.log1p(
                b * (b + 1.0) / 2.0 * q * q * math.expm1(min(1.0 / (s * s), 700.0))
                + b * (b + 1.0) * (b + 2.0) / 6.0 * q**3 * np.exp(-(b + 3.0) * math.log1p(-q))
            )
            bound = np.fmin(convex, taylor)
        return np.where(lam <= 1.0, 0.0, bound)

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
            if u < 30.0:
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
    """A PRV conditioned on t_min <= Y <= t_max (GLW truncation)."""

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
        """
        t = np.asarray(t, dtype=np.float64)
        inside = (t >= self.t_min) & (t <= self.t_max)
        return np.where(inside, self.prv.pdf(t) / self.remaining_mass, 0.0)

    def cdf(self, t):
        """P(Y <= t | t_min <= Y <= t_max): 0 below ``t_min``, 1 from ``t_max`` on (elementwise)."""
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
        """E[Y | t_min <= Y <= t_max]."""
        if hasattr(self.prv, "expectation_between"):
            inner = self.prv.expectation_between(self.t_min, self.t_max)
        else:
            inner, _ = integrate.quad(
                lambda t: t * float(self.prv.pdf(t)), self.t_min, self.t_max, limit=500
            )
        return inner / self.remaining_mass


def discretize(prv, domain: Domain) -> "DiscretePRV":
    """Mean-preserving discretisation of ``prv`` on ``domain`` (GLW Alg 1).

    Grid point t_j receives the mass of (t_j - dt/2, t_j + dt/2]; the grid is then shifted by
    E[Y] - sum_j p_j t_j (at most dt/2) so the discrete PRV has the mean of ``prv``. That keeps
    the rounding errors of independent steps zero-mean, so their sum concentrates (Hoeffding).
    ``prv`` should be truncated to the bin edges [t_min - dt/2, t_max + dt/2] so all of its mass
    lands on the grid.
    """
    ts = domain.ts
    dt = domain.dt
    edges = np.concatenate([ts - dt / 2.0, [ts[-1] + dt / 2.0]])
    if hasattr(prv, "interval_masses"):
        pmf = prv.interval_masses(edges)
    else:
        pmf = np.diff(prv.cdf(edges))
    pmf = np.maximum(pmf, 0.0)
    pmf /= pmf.sum()
    mean_shift = float(prv.mean()) - float(np.dot(pmf, ts))
    if abs(mean_shift) > dt:
        raise ValueError(
            f"discretize: the mean-preserving shift {mean_shift} exceeds the grid step {dt}; "
            "truncate the PRV to the domain's bin edges first."
        )
    return DiscretePRV(pmf=pmf, domain=domain.shift_right(mean_shift))


class DiscretePRV:
    """A PRV supported on the points of ``domain`` with probabilities ``pmf``."""

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
        """delta(eps) = E[(1 - e^{eps - Y})_+] of the discrete PRV."""
        ts = self.domain.ts
        above = ts > eps
        return float(np.sum(self.pmf[above] * -np.expm1(eps - ts[above])))

    def _epsilon_for_delta(self, delta: float) -> float:
        """Smallest eps >= 0 with delta(eps) <= delta, solved exactly between grid points.

        For eps in [t_{k-1}, t_k), delta(eps) = A_k - e^eps B_k with the tail sums
        A_k = sum_{j >= k} p_j and B_k = sum_{j >= k} p_j e^{-t_j}.
        """
        if self._tails is None:
            ts = self.domain.ts
            first = int(np.searchsorted(ts, 0.0, side="right"))  # first t_j > 0
            t_pos = ts[first:]
            p_pos = np.maximum(self.pmf[first:], 0.0)
            # Tail sums accumulated from the far tail inwards (small terms first).
            tail_a = np.cumsum(p_pos[::-1])[::-1]
            tail_b = np.cumsum((p_pos * np.exp(-t_pos))[::-1])[::-1]
            # delta at eps = t_k is A_{k+1} - e^{t_k} B_{k+1} (decreasing in k); eps > 700 is
            # meaningless, the cap only avoids inf * 0.
            delta_at_points = np.append(tail_a[1:], 0.0) - np.exp(
                np.minimum(t_pos, 700.0)
            ) * np.append(tail_b[1:], 0.0)
            self._tails = (t_pos, tail_a, tail_b, delta_at_points)
        t_pos, tail_a, tail_b, delta_at_points = self._tails
        if len(t_pos) == 0 or tail_a[0] - tail_b[0] <= delta:
            return 0.0
        # First grid point where delta has dropped to the target (delta_at_points decreases).
        k = int(np.searchsorted(-delta_at_points, -delta, side="left"))
        # eps lies in [t_{k-1}, t_k] (or [0, t_0]) where delta(eps) = A_k - e^eps B_k.
        left = t_pos[k - 1] if k > 0 else 0.0
        if not tail_b[k] > 0:  # e^{-t} underflowed: eps is past 700, report the grid point
            return float(t_pos[k])
        eps = math.log((tail_a[k] - delta) / tail_b[k])
        return float(min(max(eps, left), t_pos[k]))

    def compute_epsilon(
        self, delta: float, delta_error: float, eps_error: float
    ) -> Tuple[float, float, float]:
        """``(lower, estimate, upper)`` bounds on the true epsilon at ``delta`` (GLW Thm 5.x).

        If the discretisation is within (eps_error, delta_error) of the true PRV, i.e.
        delta_disc(eps + eps_error) - delta_error <= delta_true(eps) <= delta_disc(eps - eps_error)
        + delta_error, then eps_true(delta) lies in
        [eps_disc(delta + delta_error) - eps_error, eps_disc(delta - delta_error) + eps_error].
        """
        if not 0 < delta_error < delta:
            raise ValueError(
                f"DiscretePRV.compute_epsilon: need 0 < delta_error < delta, got "
                f"delta_error={delta_error!r}, delta={delta!r}."
            )
        estimate = self._epsilon_for_delta(delta)
        upper = self._epsilon_for_delta(delta - delta_error) + eps_error
        lower = max(self._epsilon_for_delta(delta + delta_error) - eps_error, 0.0)
        return lower, estimate, upper

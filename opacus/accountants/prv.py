"""PRV accountant: numerical composition of privacy random variables (Gopi, Lee, Wutschitz 2021).

Error budget (re-derived from GLW): with eps_error = eta and delta_error = d_e,
- the window from ``compute_safe_domain_bounds`` is left by some single PRV with probability
  <= d_e/8 (truncation) and by the composed PRV, on either side, with probability <= d_e/8 each;
- each step's mean-preserving rounding error is zero-mean and lies in an interval of width dt, so
  by Hoeffding the sum over K steps exceeds eta in absolute value with probability
  <= 2 exp(-2 eta^2 / (K dt^2)) = d_e / 8 for dt = eta sqrt(2 / (K log(16 / d_e))).
The truncation and rounding events are charged twice (once for delta itself, once for the mass
that wraps around the circular FFT), the tails once: 3/4 d_e <= d_e in total, so
delta_disc(eps + eta) - d_e <= delta_true(eps) <= delta_disc(eps - eta) + d_e.
"""

import math
from typing import Dict, List, Optional, Tuple

from opacus.accountants.accountant import IAccountant, check_delta
from opacus.accountants.analysis.prv import (
    DiscretePRV,
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    compute_safe_domain_size,
    discretize,
)
from opacus.accountants.analysis.prv.domain import compute_safe_domain_bounds

__all__ = [
    "PRVAccountant",
    "IAccountant",
    "Domain",
    "PoissonSubsampledGaussianPRV",
    "TruncatedPrivacyRandomVariable",
    "compose_heterogeneous",
    "compute_safe_domain_size",
    "discretize",
]

# Largest grid (points) before the step is coarsened: 2^22 doubles is 32 MiB per array. A coarser
# grid keeps the bounds valid but widens them (the eps error actually achieved is reported).
MAX_DOMAIN_SIZE = 1 << 22


class PRVAccountant(IAccountant):
    """Privacy accounting by discretised PRVs composed with the FFT.

    ``get_epsilon`` returns the certified *upper* bound on epsilon. ``delta_error`` defaults to
    ``delta / 1000``: it must be well below delta (the upper bound uses delta - delta_error), and
    shrinking it only costs a logarithmic amount of grid.
    """

    def __init__(self):
        super().__init__()

    def step(self, *, noise_multiplier: float, sample_rate: float):
        """Record one step; sample_rate 0 is a no-op step, noise_multiplier 0 gives inf."""
        self._record(noise_multiplier, sample_rate)

    @classmethod
    def mechanism(cls) -> str:
        """Registry name of the PRV accountant: ``"prv"`` (see ``create_accountant``)."""
        return "prv"

    def _settings(self) -> Dict[Tuple[float, float], int]:
        """Steps per distinct (sigma, q) that leak something (q > 0, finite sigma); composition
        is commutative, so equal settings anywhere in the history merge."""
        counts: Dict[Tuple[float, float], int] = {}
        for sigma, q, num_steps in self.history:
            if q > 0 and num_steps > 0 and not math.isinf(sigma):
                counts[(sigma, q)] = counts.get((sigma, q), 0) + num_steps
        return counts

    def _composed(self, eps_error: float, delta_error: float) -> Tuple[DiscretePRV, float]:
        counts = self._settings()
        prvs: List[PoissonSubsampledGaussianPRV] = [
            PoissonSubsampledGaussianPRV(q, sigma) for sigma, q in counts
        ]
        ks = list(counts.values())
        total = sum(ks)
        t_min, t_max = compute_safe_domain_bounds(prvs, ks, eps_error, delta_error)
        hoeffding = math.log(16.0 / delta_error)
        dt = eps_error * math.sqrt(2.0 / (total * hoeffding))
        if (t_max - t_min) / dt + 1 > MAX_DOMAIN_SIZE:
            dt = (t_max - t_min) / (MAX_DOMAIN_SIZE - 1)
            eps_error = dt * math.sqrt(total * hoeffding / 2.0)
        domain = Domain.create_aligned(t_min, t_max, dt)
        half = domain.dt / 2.0
        dprvs = [
            discretize(
                TruncatedPrivacyRandomVariable(prv, domain.t_min - half, domain.t_max + half),
                domain,
            )
            for prv in prvs
        ]
        return compose_heterogeneous(dprvs, ks), eps_error

    def compute_epsilon(
        self, delta: float, eps_error: float = 0.01, delta_error: Optional[float] = None
    ) -> Tuple[float, float, float]:
        """``(lower, estimate, upper)`` on epsilon at ``delta``; the true value is in
        [lower, upper]. If the history forces a grid coarser than ``MAX_DOMAIN_SIZE`` allows,
        the achieved (larger) eps error is used for the bounds."""
        check_delta("PRVAccountant.compute_epsilon", delta)
        if delta_error is None:
            delta_error = delta / 1000.0
        if not 0 < delta_error < delta:
            raise ValueError(
                f"PRVAccountant: delta_error must be in (0, delta), got {delta_error!r} with "
                f"delta={delta!r}; the default is delta / 1000."
            )
        if not eps_error > 0:
            raise ValueError(f"PRVAccountant: eps_error must be > 0, got {eps_error!r}.")
        counts = self._settings()
        if not counts:
            return 0.0, 0.0, 0.0
        if any(sigma == 0 for sigma, _ in counts):
            return math.inf, math.inf, math.inf
        composed, achieved_error = self._composed(eps_error, delta_error)
        return composed.compute_epsilon(delta, delta_error, achieved_error)

    def get_epsilon(
        self,
        delta: float,
        *,
        eps_error: float = 0.01,
        delta_error: Optional[float] = None,
        **kwargs,
    ) -> float:
        """Certified upper bound on epsilon at ``delta`` (within ~2 * eps_error of the truth)."""
        _, _, upper = self.compute_epsilon(delta, eps_error, delta_error)
        return upper

"""PRV accountant: numerical composition of privacy random variables (Gopi, Lee, Wutschitz 2021).

The numerics follow Opacus 1.6 (so that epsilons agree to 7+ places):

- one Poisson-subsampled Gaussian PRV per history entry (sigma, q, k), K = total steps;
- the window is [-L, L] with L from the RDP accountant (``compute_safe_domain_size``);
- the grid step is dt = eps_error / sqrt(K log(12 / delta_error) / 2), on an aligned grid of even
  size (``Domain.create_aligned``);
- each PRV is truncated to the grid's [t_min, t_max] and discretised with the mean-preserving
  shift, self-composed k times by FFT and the entries combined pairwise;
- the certified upper bound is eps(delta - delta_error) + eps_error on the composed pmf.
"""

import math
from typing import List, Optional, Tuple

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

# Largest grid (points) before the step is coarsened: 2^22 doubles is 32 MiB per array (Opacus 1.6
# has no cap; it is reached beyond about a million steps). A coarser grid keeps the bounds valid
# but widens them by the eps error actually achieved.
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
        """Record one step; sample_rate 0 is a no-op step, noise_multiplier 0 gives inf.

        Args:
            noise_multiplier: sigma of the step: noise standard deviation divided by the clipping
                norm.
            sample_rate: the probability with which each example was sampled into the step's batch.
        """
        self._record(noise_multiplier, sample_rate)

    @classmethod
    def mechanism(cls) -> str:
        """Registry name of the PRV accountant: ``"prv"`` (see ``create_accountant``).

        Returns:
            ``"prv"``.
        """
        return "prv"

    def _entries(self) -> List[Tuple[float, float, int]]:
        """History entries that leak something (q > 0, k > 0, finite sigma), one PRV each."""
        return [
            (sigma, q, int(k))
            for sigma, q, k in self.history
            if q > 0 and k > 0 and not math.isinf(sigma)
        ]

    def _domain(self, prvs, ks, eps_error: float, delta_error: float) -> Tuple[Domain, float]:
        """The grid [-L, L] of step dt = eps_error / sqrt(K log(12 / delta_error) / 2), aligned,
        and the eps error it achieves (larger than ``eps_error`` only when the grid had to be
        coarsened to ``MAX_DOMAIN_SIZE`` points)."""
        total = sum(ks)
        half_width = compute_safe_domain_size(prvs, ks, eps_error, delta_error)
        hoeffding = math.log(12.0 / delta_error)
        dt = eps_error / math.sqrt(total * hoeffding / 2.0)
        if 2.0 * half_width / dt + 3 > MAX_DOMAIN_SIZE:
            dt = 2.0 * half_width / (MAX_DOMAIN_SIZE - 3)
            eps_error = dt * math.sqrt(total * hoeffding / 2.0)
        return Domain.create_aligned(-half_width, half_width, dt), eps_error

    def _composed(self, eps_error: float, delta_error: float) -> Tuple[DiscretePRV, float]:
        entries = self._entries()
        prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in entries]
        ks = [k for _, _, k in entries]
        domain, eps_error = self._domain(prvs, ks, eps_error, delta_error)
        dprvs = [
            discretize(TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max), domain)
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
        entries = self._entries()
        if not entries:
            return 0.0, 0.0, 0.0
        if any(sigma == 0 for sigma, _, _ in entries):
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
        """Certified upper bound on epsilon at ``delta`` (within ~2 * eps_error of the truth).

        Args:
            delta: the δ of the (ε, δ) guarantee.
            eps_error: the ε error allowed to the numerical composition.
            delta_error: the δ error allowed (``delta / 1000`` if None).

        Returns:
            the certified upper bound on ε at ``delta``.
        """
        _, _, upper = self.compute_epsilon(delta, eps_error, delta_error)
        return upper

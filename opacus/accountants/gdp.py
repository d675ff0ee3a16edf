"""Gaussian DP accountant via the CLT (Dong, Roth, Su 2019; Bu et al. 2020)."""

import math

from opacus.accountants.accountant import IAccountant, check_delta
from opacus.accountants.analysis import gdp as privacy_analysis

__all__ = ["GaussianAccountant", "IAccountant"]


class GaussianAccountant(IAccountant):
    """mu-GDP of noisy SGD from the central limit theorem.

    The CLT needs a single (noise_multiplier, sample_rate) for the whole run: a history with two
    different settings raises ``ValueError`` in :meth:`get_epsilon` (use RDP or PRV instead).
    The CLT is an asymptotic approximation (accurate for many steps with small sample rates), not
    a certified upper bound.
    """

    def __init__(self):
        super().__init__()

    def step(self, *, noise_multiplier: float, sample_rate: float):
        """Record one step (noise_multiplier must be > 0 when epsilon is asked for).

        Args:
            noise_multiplier: sigma of the step: noise standard deviation divided by the clipping
                norm.
            sample_rate: the probability with which each example was sampled into the step's batch.
        """
        self._record(noise_multiplier, sample_rate)

    @classmethod
    def mechanism(cls) -> str:
        """Registry name of the Gaussian-DP (CLT) accountant: ``"gdp"`` (``create_accountant``).

        Returns:
            ``"gdp"``.
        """
        return "gdp"

    def get_epsilon(self, delta: float, poisson: bool = True, **kwargs) -> float:
        """Epsilon at ``delta``; ``poisson=False`` uses the uniform (without replacement) CLT.

        Args:
            delta: the δ of the (ε, δ) guarantee.
            poisson: True for Poisson sampling, False for uniform sampling without replacement.

        Returns:
            ε at ``delta`` (0 for an empty history).

        Raises:
            ValueError: the history mixes several (noise_multiplier, sample_rate) settings, or
                ``delta`` is not in (0, 1).
        """
        check_delta("GaussianAccountant.get_epsilon", delta)
        if not self.history:
            return 0.0
        settings = {(sigma, q) for sigma, q, _ in self.history}
        if len(settings) > 1:
            raise ValueError(
                "GaussianAccountant.get_epsilon: the GDP CLT holds for a single "
                f"(noise_multiplier, sample_rate) but the history has {sorted(settings)}; use "
                "the 'rdp' or 'prv' accountant for runs whose noise or sampling rate changes."
            )
        ((noise_multiplier, sample_rate),) = settings
        if sample_rate == 0 or math.isinf(noise_multiplier):
            return 0.0
        if noise_multiplier == 0:
            return float("inf")
        if poisson:
            compute_eps = privacy_analysis.compute_eps_poisson
        else:
            compute_eps = privacy_analysis.compute_eps_uniform
        return compute_eps(
            steps=len(self),
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            delta=delta,
        )

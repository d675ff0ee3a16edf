"""Rényi DP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019)."""

from typing import List, Optional, Tuple, Union

import numpy as np

from opacus.accountants.accountant import IAccountant, check_delta
from opacus.accountants.analysis import rdp as privacy_analysis

__all__ = ["RDPAccountant", "IAccountant"]


class RDPAccountant(IAccountant):
    """Tracks the RDP curve of the history and converts it with Balle et al. 2020, Thm 21.

    RDP composes additively, so the curve is the sum over history entries of
    ``num_steps * RDP_one_step(sigma, q)`` at every order; epsilon is the best over the orders.
    """

    DEFAULT_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

    def __init__(self):
        super().__init__()

    def step(self, *, noise_multiplier: float, sample_rate: float):
        """Record one step; sample_rate 0 is a no-op step (RDP 0), noise_multiplier 0 gives inf.

        Args:
            noise_multiplier: sigma of the step: noise standard deviation divided by the clipping
                norm.
            sample_rate: the probability with which each example was sampled into the step's batch.
        """
        self._record(noise_multiplier, sample_rate)

    @classmethod
    def mechanism(cls) -> str:
        """Registry name of the Renyi-DP accountant: ``"rdp"`` (see ``create_accountant``).

        Returns:
            ``"rdp"``.
        """
        return "rdp"

    def get_privacy_spent(
        self, *, delta: float, alphas: Optional[List[Union[float, int]]] = None
    ) -> Tuple[float, float]:
        """``(eps, best_alpha)`` at ``delta``; a history that releases nothing (empty, or only
        sample_rate 0 / infinite noise) spends nothing: ``(0.0, nan)``.

        Args:
            delta: the δ of the (ε, δ) guarantee.
            alphas: the Rényi orders to optimise over (``DEFAULT_ALPHAS`` if None).

        Returns:
            ``(eps, best_alpha)``.
        """
        check_delta("RDPAccountant.get_privacy_spent", delta)
        if alphas is None:
            alphas = self.DEFAULT_ALPHAS
        if not self.history:
            return 0.0, float("nan")
        rdp = sum(
            np.asarray(
                privacy_analysis.compute_rdp(
                    q=sample_rate,
                    noise_multiplier=noise_multiplier,
                    steps=num_steps,
                    orders=alphas,
                )
            )
            for noise_multiplier, sample_rate, num_steps in self.history
        )
        if not np.any(rdp):
            # Zero divergence at every order: the outputs are identical, (0, 0)-DP exactly (the
            # conversion below would only give its floor).
            return 0.0, float("nan")
        eps, best_alpha = privacy_analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)
        return float(eps), float(best_alpha)

    def get_epsilon(
        self, delta: float, alphas: Optional[List[Union[float, int]]] = None, **kwargs
    ) -> float:
        """Epsilon spent so far at ``delta`` (minimised over ``alphas``, default DEFAULT_ALPHAS).

        Args:
            delta: the δ of the (ε, δ) guarantee.
            alphas: the Rényi orders to optimise over (``DEFAULT_ALPHAS`` if None).
        """
        eps, _ = self.get_privacy_spent(delta=delta, alphas=alphas)
        return eps

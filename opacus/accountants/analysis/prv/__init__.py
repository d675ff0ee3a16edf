"""Privacy random variable (PRV) accounting, Gopi, Lee, Wutschitz 2021. No torch dependency."""

from opacus.accountants.analysis.prv.compose import compose_heterogeneous
from opacus.accountants.analysis.prv.domain import Domain, compute_safe_domain_size
from opacus.accountants.analysis.prv.prvs import (
    DiscretePRV,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    discretize,
)

__all__ = [
    "DiscretePRV",
    "Domain",
    "PoissonSubsampledGaussianPRV",
    "TruncatedPrivacyRandomVariable",
    "compose_heterogeneous",
    "compute_safe_domain_size",
    "discretize",
]

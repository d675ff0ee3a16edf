"""Privacy accountants: turn the history of noisy steps into (epsilon, delta)-DP.

- ``RDPAccountant`` ("rdp"): Rényi DP of the sampled Gaussian mechanism, converted to
  (eps, delta) (Mironov 2017; Mironov, Talwar, Zhang 2019; Balle et al. 2020).
- ``PRVAccountant`` ("prv"): numerical composition of privacy random variables, with certified
  error bars (Gopi, Lee, Wutschitz 2021); the tightest of the three.
- ``GaussianAccountant`` ("gdp"): Gaussian DP via the central limit theorem (Dong, Roth, Su
  2019); an approximation, single (noise, sample rate) setting only.

A step with sample_rate 0 releases nothing and costs no privacy; noise_multiplier 0 with a positive
sample rate makes epsilon infinite (GDP: also infinite).
"""

from opacus.accountants.accountant import IAccountant
from opacus.accountants.gdp import GaussianAccountant
from opacus.accountants.prv import PRVAccountant
from opacus.accountants.rdp import RDPAccountant
from opacus.accountants.registry import create_accountant, register_accountant

__all__ = [
    "IAccountant",
    "GaussianAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "create_accountant",
    "register_accountant",
]

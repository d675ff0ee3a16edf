"""Poisson batch samplers, at their Opacus 1.6 path: see ``opacus.data_loader.samplers``."""

from opacus.data_loader.samplers import (
    CyclicPoissonSampler,
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)

__all__ = [
    "CyclicPoissonSampler",
    "DistributedUniformWithReplacementSampler",
    "UniformWithReplacementSampler",
]

"""opacus.optimizers.noise: distribution, reproducibility, secure mode."""

import math

import pytest
import torch

from opacus.optimizers import noise

# Kolmogorov-Smirnov critical values of sqrt(n) * D: alpha = 1e-3 -> 1.95, alpha = 1e-6 -> 2.63
KS_CRIT_1E3, KS_CRIT_1E6 = 1.95, 2.63


def ks_statistic(z: torch.Tensor, std: float) -> float:
    """``sqrt(n) * sup |F_n - Phi_std|`` of the sample ``z`` against ``N(0, std^2)``."""
    z, _ = z.double().flatten().sort()
    n = z.numel()
    cdf = 0.5 * (1 + torch.erf(z / (std * math.sqrt(2))))
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    lower = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return math.sqrt(n) * max(upper.max().item(), lower.max().item())


def test_distribution_with_fixed_seed_passes_ks_test():
    ref = torch.zeros(20000, dtype=torch.float64)
    z = noise.gaussian_noise(0.37, ref, generator=torch.Generator().manual_seed(3))
    assert z.shape == ref.shape and z.dtype == ref.dtype
    assert ks_statistic(z, 0.37) < KS_CRIT_1E3
    # and the test has power: a std 14% off is rejected (the statistic matches scipy's kstest)
    assert ks_statistic(z, 0.42) > KS_CRIT_1E6


def test_zero_std_is_exact_zeros_and_draws_nothing():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    z = noise.gaussian_noise(0.0, torch.ones(3, 2), generator=gen)
    assert torch.equal(z, torch.zeros(3, 2))
    assert torch.equal(gen.get_state(), state)


def test_generator_reproducible():
    a = noise.gaussian_noise(1.0, torch.zeros(10), generator=torch.Generator().manual_seed(1))
    b = noise.gaussian_noise(1.0, torch.zeros(10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_secure_mode_std_and_resampling(monkeypatch):
    ref = torch.zeros(100_000, dtype=torch.float64)
    z = noise.gaussian_noise(2.5, ref, secure_mode=True)
    assert abs(z.std().item() / 2.5 - 1) < 0.02  # relative sd of the estimate: 0.22%
    assert abs(z.mean().item()) < 5 * 2.5 / math.sqrt(ref.numel())
    assert ks_statistic(z, 2.5) < KS_CRIT_1E6

    sizes = []
    real_normal = torch.normal

    def spy(*args, **kwargs):
        sizes.append((args[1], tuple(kwargs["size"])))
        return real_normal(*args, **kwargs)

    monkeypatch.setattr(torch, "normal", spy)
    noise.gaussian_noise(2.0, torch.zeros(4), secure_mode=True)
    # one call drawing n=2 normals of std sigma/sqrt(2) per coordinate
    assert sizes == [(2.0 / math.sqrt(2), (2, 4))]


def test_secure_generators_are_not_seeded_alike():
    a = noise.gaussian_noise(1.0, torch.zeros(8), secure_mode=True)
    noise._secure_generators.clear()
    b = noise.gaussian_noise(1.0, torch.zeros(8), secure_mode=True)
    assert not torch.equal(a, b)


def test_errors():
    with pytest.raises(ValueError, match="std"):
        noise.gaussian_noise(-1.0, torch.zeros(2))
    with pytest.raises(ValueError, match="generator"):
        noise.gaussian_noise(1.0, torch.zeros(2), generator=torch.Generator(), secure_mode=True)

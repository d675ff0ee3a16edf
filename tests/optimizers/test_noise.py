"""opacus.optimizers.noise: distribution, reproducibility, secure mode."""

import math

import pytest
import torch
from scipy import stats

from opacus.optimizers import noise


def test_distribution_with_fixed_seed_passes_ks_test():
    ref = torch.zeros(20000, dtype=torch.float64)
    z = noise.gaussian_noise(0.37, ref, generator=torch.Generator().manual_seed(3))
    assert z.shape == ref.shape and z.dtype == ref.dtype
    assert stats.kstest(z.numpy(), "norm", args=(0, 0.37)).pvalue > 1e-3
    # and is far from a wrong std
    assert stats.kstest(z.numpy(), "norm", args=(0, 0.4)).pvalue < 1e-6


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
    assert stats.kstest(z.numpy(), "norm", args=(0, 2.5)).pvalue > 1e-6

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

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


def test_secure_mode_std_and_distribution():
    ref = torch.zeros(100_000, dtype=torch.float64)
    z = noise.gaussian_noise(2.5, ref, secure_mode=True)
    assert abs(z.std().item() / 2.5 - 1) < 0.02  # relative sd of the estimate: 0.22%
    assert abs(z.mean().item()) < 5 * 2.5 / math.sqrt(ref.numel())
    assert ks_statistic(z, 2.5) < KS_CRIT_1E6


def test_secure_mode_never_uses_torchs_generators(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("secure mode must not draw from torch's (non-cryptographic) RNG")

    for name in ("normal", "randn", "rand", "randint", "randperm", "manual_seed"):
        monkeypatch.setattr(torch, name, refuse)
    state = torch.get_rng_state()
    z = noise.gaussian_noise(1.0, torch.zeros(1000), secure_mode=True)
    assert z.std() > 0.5 and torch.equal(torch.get_rng_state(), state)


def test_secure_mode_is_sum_of_four_draws_over_two_after_one_discarded_scalar(monkeypatch):
    """Holohan-Braghin with n = 2: a sampler patched to 0.6 everywhere gives 4 * 0.6 / 2."""
    draws = []

    def constant(shape, *, dtype, device):
        draws.append(tuple(shape))
        return torch.full(tuple(shape), 0.6, dtype=dtype, device=device)

    monkeypatch.setattr(noise, "csprng_standard_normal", constant)
    z = noise.gaussian_noise(1.0, torch.zeros(3, 4, dtype=torch.float64), secure_mode=True)
    torch.testing.assert_close(z, torch.full((3, 4), 1.2, dtype=torch.float64))
    assert draws == [(), (3, 4), (3, 4), (3, 4), (3, 4)]


def test_csprng_standard_normal_moments_and_uniform_bits():
    z = noise.csprng_standard_normal((200_001,), dtype=torch.float64)
    assert z.shape == (200_001,) and z.dtype == torch.float64
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / z.numel())
    assert ks_statistic(z, 1.0) < KS_CRIT_1E6
    # fourth moment of N(0, 1) is 3 (sd of the estimate sqrt(96 / n) ~ 0.022)
    assert abs((z**4).mean().item() - 3) < 0.15
    u1, u2 = noise._csprng_uniforms(50_000)
    assert 0 < u1.min() and u1.max() <= 1 and 0 <= u2.min() and u2.max() < 1
    assert abs(u2.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / 50_000)
    assert noise.csprng_standard_normal((2, 3), dtype=torch.float16).dtype == torch.float16


def test_secure_generators_are_not_seeded_alike():
    a = torch.randn(8, generator=noise.secure_generator("cpu"))
    noise._secure_generators.clear()
    b = torch.randn(8, generator=noise.secure_generator("cpu"))
    assert not torch.equal(a, b)
    assert noise.secure_generator("cpu") is noise.secure_generator(torch.device("cpu"))


def test_errors():
    with pytest.raises(ValueError, match="std"):
        noise.gaussian_noise(-1.0, torch.zeros(2))
    with pytest.raises(ValueError, match="std"):
        noise.gaussian_noise(float("inf"), torch.zeros(2))
    with pytest.raises(ValueError, match="generator"):
        noise.gaussian_noise(1.0, torch.zeros(2), generator=torch.Generator(), secure_mode=True)


def _noisy(*args, **kwargs):
    out = dict(noise.with_gaussian_noise(*args, **kwargs))
    return [out[i] for i in range(len(out))]


def _spy_normal(monkeypatch):
    calls = []
    real_normal = torch.normal

    def spy(*args, **kwargs):
        calls.append((kwargs["dtype"], tuple(kwargs["size"])))
        return real_normal(*args, **kwargs)

    monkeypatch.setattr(torch, "normal", spy)
    return calls


REFS = [
    torch.zeros(3, 4),
    torch.zeros(7, dtype=torch.float64),
    torch.zeros(2, 5).t(),  # non-contiguous
    torch.zeros(0),
    torch.zeros(6, dtype=torch.float64),
]


def test_with_gaussian_noise_draws_per_tensor_on_cpu(monkeypatch):
    calls = _spy_normal(monkeypatch)
    out = _noisy(0.5, REFS, generator=torch.Generator().manual_seed(0))
    assert [c[1] for c in calls] == [(3, 4), (7,), (5, 2), (0,), (6,)]
    assert all(o.shape == r.shape and o.dtype == r.dtype for o, r in zip(out, REFS))


def test_with_gaussian_noise_one_call_per_device_and_dtype(monkeypatch):
    calls = _spy_normal(monkeypatch)
    out = _noisy(0.5, REFS, generator=torch.Generator().manual_seed(0), one_call_per_device=True)
    assert sorted(calls, key=str) == sorted(
        [(torch.float32, (22,)), (torch.float64, (13,))], key=str
    )
    assert all(o.shape == r.shape and o.dtype == r.dtype for o, r in zip(out, REFS))
    values = torch.cat([o.flatten().double() for o in out])
    assert values.unique().numel() == values.numel() == 35  # every tensor its own draws


@pytest.mark.parametrize("one_call", [False, True])
def test_with_gaussian_noise_is_gaussian_added_and_reproducible(one_call):
    tensors = [torch.full((n,), 5.0, dtype=torch.float64) for n in (5000, 1, 15000, 17)]
    before = [t.clone() for t in tensors]
    kw = dict(one_call_per_device=one_call)
    out = _noisy(1.3, tensors, generator=torch.Generator().manual_seed(5), **kw)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))  # inputs untouched
    assert all(o.data_ptr() != t.data_ptr() for o, t in zip(out, tensors))
    assert ks_statistic(torch.cat(out) - 5.0, 1.3) < KS_CRIT_1E3
    assert ks_statistic(torch.cat(out) - 5.0, 1.5) > KS_CRIT_1E6
    again = _noisy(1.3, tensors, generator=torch.Generator().manual_seed(5), **kw)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert all(torch.equal(o, t) for o, t in zip(_noisy(0.0, tensors, **kw), tensors))
    secure = _noisy(2.0, tensors, secure_mode=True, **kw)
    assert ks_statistic(torch.cat(secure) - 5.0, 2.0) < KS_CRIT_1E6


def test_with_gaussian_noise_per_tensor_is_gaussian_noise_bit_for_bit():
    # The per-tensor CPU path draws directly: the same draws, in the same order, as one
    # gaussian_noise() per tensor added to it (the oracle), and the same refusals.
    tensors = [torch.randn(3, 4), torch.randn(7, dtype=torch.float64), torch.randn(2, 5).t()]
    out = _noisy(0.7, tensors, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    expected = [noise.gaussian_noise(0.7, t, generator=gen) + t for t in tensors]
    assert all(torch.equal(o, e) and o.dtype == e.dtype for o, e in zip(out, expected))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="std"):
            _noisy(bad, tensors)


# ------------------------------------------------ the 1.6 helper opacus.optimizers.optimizer
def test_generate_noise_zero_std_gives_zeros_without_touching_the_generator():
    from opacus.optimizers.optimizer import _generate_noise

    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    ref = torch.ones(3, 2, dtype=torch.float64)
    z = _generate_noise(0.0, ref, gen)
    assert torch.equal(z, torch.zeros_like(ref)) and z.dtype == ref.dtype
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(_generate_noise(0.0, ref, secure_mode=True), torch.zeros_like(ref))


def test_generate_noise_is_one_draw_of_the_generator():
    from opacus.optimizers.optimizer import _generate_noise

    ref = torch.zeros(50_000, dtype=torch.float64)
    z = _generate_noise(0.7, ref, torch.Generator().manual_seed(3))
    # one draw of torch.normal with the generator, nothing else
    expected = torch.normal(
        0.0, 0.7, size=(50_000,), generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    assert torch.equal(z, expected)
    assert abs(z.std().item() / 0.7 - 1) < 0.03 and abs(z.mean().item()) < 5 * 0.7 / 224
    assert ks_statistic(z, 0.7) < KS_CRIT_1E6


def test_generate_noise_secure_mode_patched_sampler_gives_1_2(monkeypatch):
    from opacus.optimizers.optimizer import _generate_noise

    monkeypatch.setattr(
        noise,
        "csprng_standard_normal",
        lambda shape, *, dtype, device: torch.full(tuple(shape), 0.6, dtype=dtype),
    )
    torch.testing.assert_close(
        _generate_noise(1.0, torch.zeros(2, 5), secure_mode=True), torch.full((2, 5), 1.2)
    )


def test_generate_noise_secure_mode_moments():
    from opacus.optimizers.optimizer import _generate_noise

    z = _generate_noise(3.0, torch.zeros(100_000, dtype=torch.float64), secure_mode=True)
    assert abs(z.std().item() / 3.0 - 1) < 0.02
    assert abs(z.mean().item()) < 5 * 3.0 / math.sqrt(z.numel())
    assert ks_statistic(z, 3.0) < KS_CRIT_1E6

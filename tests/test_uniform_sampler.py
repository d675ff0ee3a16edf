"""Poisson samplers against the Binomial law they must follow (closed-form oracle)."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from scipy import stats

from opacus.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)


def _batches(sampler):
    return [list(b) for b in sampler]


def test_batch_sizes_follow_binomial():
    n, q, steps = 60, 0.1, 3000
    g = torch.Generator().manual_seed(0)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=g, steps=steps)
    sizes = np.array([len(b) for b in sampler])
    assert len(sizes) == steps
    # Mean and variance of Binomial(n, q), within ~4 standard errors.
    assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / steps)
    assert abs(sizes.var(ddof=1) - n * q * (1 - q)) < 4 * n * q * (1 - q) * np.sqrt(2 / steps)
    # Chi-square goodness of fit on the pmf, tail bins merged.
    k_max = 12
    observed = np.array([(sizes == k).sum() for k in range(k_max)] + [(sizes >= k_max).sum()])
    pmf = stats.binom.pmf(np.arange(k_max), n, q)
    expected = steps * np.append(pmf, 1 - pmf.sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_inclusions_are_independent_and_uniform():
    n, q, steps = 20, 0.3, 4000
    g = torch.Generator().manual_seed(1)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=g, steps=steps)
    incl = np.zeros((steps, n))
    for t, b in enumerate(sampler):
        assert len(set(b)) == len(b), "an index appears twice in one batch"
        assert all(0 <= i < n for i in b)
        incl[t, b] = 1
    se = np.sqrt(q * (1 - q) / steps)
    assert np.abs(incl.mean(0) - q).max() < 5 * se
    # Pairwise joint inclusion ~ q^2 (independence across indices).
    joint = (incl[:, :, None] * incl[:, None, :]).mean(0)[~np.eye(n, dtype=bool)]
    assert np.abs(joint - q * q).max() < 5 * np.sqrt(q * q * (1 - q * q) / steps)


def test_length_and_determinism():
    s = UniformWithReplacementSampler(num_samples=10, sample_rate=0.25)
    assert len(s) == 4 and len(list(s)) == 4
    assert len(UniformWithReplacementSampler(num_samples=10, sample_rate=1 / 7)) == 7
    assert len(UniformWithReplacementSampler(num_samples=10, sample_rate=0.5, steps=9)) == 9
    a = _batches(
        UniformWithReplacementSampler(
            num_samples=50, sample_rate=0.2, generator=torch.Generator().manual_seed(3)
        )
    )
    b = _batches(
        UniformWithReplacementSampler(
            num_samples=50, sample_rate=0.2, generator=torch.Generator().manual_seed(3)
        )
    )
    assert a == b
    # sample_rate = 1 takes everything.
    full = _batches(UniformWithReplacementSampler(num_samples=7, sample_rate=1.0))
    assert full == [list(range(7))]


def test_empty_batches_are_yielded():
    g = torch.Generator().manual_seed(0)
    s = UniformWithReplacementSampler(num_samples=3, sample_rate=0.01, generator=g)
    sizes = [len(b) for b in s]
    assert len(sizes) == 100 and sizes.count(0) > 80


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, float("nan")])
def test_bad_sample_rate(q):
    with pytest.raises(ValueError, match="sample_rate"):
        UniformWithReplacementSampler(num_samples=10, sample_rate=q)


@pytest.mark.parametrize("n", [0, -3])
def test_bad_num_samples(n):
    with pytest.raises(ValueError, match="num_samples"):
        UniformWithReplacementSampler(num_samples=n, sample_rate=0.1)


def test_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        UniformWithReplacementSampler(num_samples=10, sample_rate=0.1, steps=0)


def _fake_group(monkeypatch, rank, world_size):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: world_size)


@pytest.mark.parametrize("shuffle", [True, False])
def test_distributed_shards_partition_the_dataset(monkeypatch, shuffle):
    total, world = 23, 3
    shards = []
    for rank in range(world):
        _fake_group(monkeypatch, rank, world)
        s = DistributedUniformWithReplacementSampler(
            total_size=total, sample_rate=1.0, shuffle=shuffle, shuffle_seed=5
        )
        (batch,) = list(s)
        assert s.num_samples == len(batch)
        shards.append(batch)
    flat = sorted(i for b in shards for i in b)
    assert flat == list(range(total)), "shards must be disjoint and cover the dataset"
    if not shuffle:
        assert shards[1] == list(range(1, total, world))


def test_distributed_set_epoch_reshuffles(monkeypatch):
    _fake_group(monkeypatch, 0, 2)
    s = DistributedUniformWithReplacementSampler(total_size=40, sample_rate=1.0)
    first = list(s)[0]
    again = list(s)[0]
    s.set_epoch(1)
    other = list(s)[0]
    assert first == again and sorted(first) != sorted(other)


def test_distributed_poisson_rate(monkeypatch):
    _fake_group(monkeypatch, 1, 2)
    q, steps = 0.2, 2000
    s = DistributedUniformWithReplacementSampler(
        total_size=41, sample_rate=q, steps=steps, generator=torch.Generator().manual_seed(0)
    )
    assert len(s) == steps
    sizes = np.array([len(b) for b in s])
    m = s.num_samples
    assert m == 20
    assert abs(sizes.mean() - m * q) < 4 * np.sqrt(m * q * (1 - q) / steps)
    assert abs(sizes.var(ddof=1) - m * q * (1 - q)) < 4 * m * q * (1 - q) * np.sqrt(2 / steps)


def test_distributed_requires_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised here")
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedUniformWithReplacementSampler(total_size=10, sample_rate=0.1)

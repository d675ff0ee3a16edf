"""Poisson samplers against the Binomial law they must follow (closed-form oracle)."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
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


@pytest.mark.parametrize("q, steps", [(0.35, 2), (0.06, 16), (0.1, 10), (0.3, 3), (0.7, 1)])
def test_epoch_length_truncates(q, steps):
    # Contract values: int(1 / q), not round(1 / q) (0.35 -> 2, 0.06 -> 16).
    assert len(UniformWithReplacementSampler(num_samples=10, sample_rate=q)) == steps
    s = _distributed(0, 2, total_size=10, sample_rate=q)
    assert len(s) == steps and len(list(s)) == steps


@settings(max_examples=200, deadline=None)
@given(q=st.floats(1e-4, 1.0, exclude_min=True))
def test_an_epoch_never_exceeds_one_pass(q):
    # Closed form: the epoch length L is the largest whole number with L * q <= 1 (up to the
    # rounding of 1 / q itself), so calibration by epochs never undercounts the steps.
    n = len(UniformWithReplacementSampler(num_samples=5, sample_rate=q))
    assert n >= 1
    assert n * q <= 1 + 1e-12
    assert (n + 1) * q > 1 - 1e-12


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
    # Only the two functions the sampler calls: no process group, no is_initialized().
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: world_size)


def _distributed(rank, world_size, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        _fake_group(mp, rank, world_size)
        return DistributedUniformWithReplacementSampler(**kwargs)


def test_distributed_reads_rank_once_in_init(monkeypatch):
    # Two ranks simulated in one process, with a rank lookup bound late (as 1.6's tests do).
    current = {"rank": 0}
    calls = []

    def get_rank(*a, **k):
        calls.append("rank")
        return current["rank"]

    monkeypatch.setattr(dist, "get_rank", get_rank)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    samplers = []
    for rank in range(2):
        current["rank"] = rank
        samplers.append(
            DistributedUniformWithReplacementSampler(
                total_size=100, sample_rate=0.1, generator=torch.Generator().manual_seed(7)
            )
        )
    assert calls == ["rank", "rank"]
    # Contract numbers: 100 items, 2 ranks, q = 0.1 -> 10 batches, local batches of ~5.
    seen = []
    for s in samplers:
        assert len(s) == 10 and s.num_batches == 10
        assert (s.num_replicas, s.num_samples, s.total_size, s.epoch) == (2, 50, 100, 0)
        batches = list(s)
        assert len(batches) == 10
        for b in batches:
            assert isinstance(b, torch.Tensor) and b.dtype == torch.int64 and b.dim() == 1
        sizes = [len(b) for b in batches]
        assert abs(np.mean(sizes) - 5) <= 2 and len(set(sizes)) > 1
        seen.append({b[i].item() for b in batches for i in range(len(b))})
    assert calls == ["rank", "rank"], "the rank must not be read again while iterating"
    assert samplers[0].rank == 0 and samplers[1].rank == 1
    assert not seen[0] & seen[1], "the two ranks' batches must not overlap"


def test_distributed_attributes(monkeypatch):
    g = torch.Generator()
    s = _distributed(
        1, 3, total_size=10, sample_rate=0.25, shuffle=False, shuffle_seed=4, steps=6, generator=g
    )
    assert (s.total_size, s.sample_rate, s.shuffle, s.shuffle_seed) == (10, 0.25, False, 4)
    assert (s.num_replicas, s.rank, s.num_samples, s.num_batches) == (3, 1, 3, 6)
    assert s.generator is g and s.epoch == 0 and len(s) == 6


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("total, world", [(23, 3), (4, 4), (2, 3), (100, 2)])
def test_distributed_shards_partition_the_dataset(shuffle, total, world):
    shards = []
    for rank in range(world):
        s = _distributed(
            rank, world, total_size=total, sample_rate=1.0, shuffle=shuffle, shuffle_seed=5
        )
        (batch,) = list(s)
        assert s.num_samples == len(batch)
        # No padding: lower ranks take one more when world does not divide total.
        assert s.num_samples == total // world + (rank < total % world)
        shards.append(batch.tolist())
    flat = sorted(i for b in shards for i in b)
    assert flat == list(range(total)), "shards must be disjoint and cover the dataset"
    if not shuffle:
        for rank in range(world):
            assert shards[rank] == list(range(rank, total, world))


def test_distributed_set_epoch_reshuffles():
    shards = {}
    for epoch in (0, 1):
        for rank in range(2):
            s = _distributed(rank, 2, total_size=40, sample_rate=1.0)
            s.set_epoch(epoch)
            shards[epoch, rank] = [b.tolist() for b in s][0]
    again = _distributed(0, 2, total_size=40, sample_rate=1.0)
    assert [b.tolist() for b in again][0] == shards[0, 0], "same epoch, same shard"
    assert sorted(shards[0, 0]) != sorted(shards[1, 0]), "set_epoch must change the shuffle"
    for epoch in (0, 1):
        assert sorted(shards[epoch, 0] + shards[epoch, 1]) == list(range(40))


def test_distributed_poisson_rate():
    q, steps = 0.2, 2000
    s = _distributed(
        1, 2, total_size=41, sample_rate=q, steps=steps, generator=torch.Generator().manual_seed(0)
    )
    assert len(s) == steps
    sizes = np.array([len(b) for b in s])
    m = s.num_samples
    assert m == 20
    assert abs(sizes.mean() - m * q) < 4 * np.sqrt(m * q * (1 - q) / steps)
    assert abs(sizes.var(ddof=1) - m * q * (1 - q)) < 4 * m * q * (1 - q) * np.sqrt(2 / steps)


def test_distributed_yields_empty_batches_as_empty_int64_tensors():
    # Deliberate deviation from 1.6 (which skips them): every rank takes len(sampler) steps.
    s = _distributed(
        0, 2, total_size=6, sample_rate=0.01, generator=torch.Generator().manual_seed(0)
    )
    batches = list(s)
    assert len(batches) == len(s) == 100
    empty = [b for b in batches if b.numel() == 0]
    assert len(empty) > 80
    assert all(b.dtype == torch.int64 and b.shape == (0,) for b in empty)


def test_distributed_bad_arguments():
    with pytest.raises(ValueError, match="DistributedUniformWithReplacementSampler.*total_size"):
        _distributed(0, 2, total_size=0, sample_rate=0.1)
    with pytest.raises(ValueError, match="DistributedUniformWithReplacementSampler.*sample_rate"):
        _distributed(0, 2, total_size=10, sample_rate=1.5)
    with pytest.raises(ValueError, match="steps"):
        _distributed(0, 2, total_size=10, sample_rate=0.5, steps=0)


def test_distributed_without_process_group_raises_torch_error():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised here")
    with pytest.raises((RuntimeError, ValueError), match="init_process_group") as info:
        DistributedUniformWithReplacementSampler(total_size=10, sample_rate=0.1)
    if hasattr(info.value, "add_note"):
        assert "DistributedUniformWithReplacementSampler" in " ".join(info.value.__notes__)

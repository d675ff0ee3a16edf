"""The Poisson samplers live on the data path (``opacus.data_loader.samplers``) and stay
importable, picklable and ``isinstance``-checkable at their Opacus 1.6 path
``opacus.utils.uniform_sampler``."""

import pickle

import pytest
import torch
import torch.distributed as dist

import opacus.data_loader as data_loader
import opacus.data_loader.samplers as samplers
import opacus.utils.uniform_sampler as uniform_sampler

NAMES_16 = ["DistributedUniformWithReplacementSampler", "UniformWithReplacementSampler"]
NAMES = NAMES_16 + ["CyclicPoissonSampler"]


@pytest.mark.parametrize("name", NAMES)
def test_the_old_path_re_exports_the_same_objects(name):
    cls = getattr(samplers, name)
    assert getattr(uniform_sampler, name) is cls
    assert getattr(data_loader, name) is cls  # DPDataLoader's module re-exports them too
    assert cls.__module__ == "opacus.data_loader.samplers"
    assert set(uniform_sampler.__all__) == set(NAMES)


def test_the_old_path_is_a_thin_re_export():
    """Only imports at the 1.6 path: the code is in one place."""
    public = {n for n in vars(uniform_sampler) if not n.startswith("_")}
    assert public == set(NAMES)


def _draws(sampler, n=5):
    return [list(map(int, b)) for _, b in zip(range(n), sampler)]


def _local_group(monkeypatch, rank=1, world_size=3):
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: world_size)


def _instances(monkeypatch):
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    out = [
        samplers.UniformWithReplacementSampler(num_samples=30, sample_rate=0.2, generator=g(1)),
        samplers.CyclicPoissonSampler(num_samples=30, sample_rate=0.2, bands=2, generator=g(2)),
    ]
    with monkeypatch.context() as mp:
        _local_group(mp)
        out.append(
            samplers.DistributedUniformWithReplacementSampler(
                total_size=30, sample_rate=0.2, generator=g(3)
            )
        )
    return out


def test_samplers_pickle_round_trip_and_isinstance_on_both_paths(monkeypatch):
    for sampler in _instances(monkeypatch):
        name = type(sampler).__name__
        copy = pickle.loads(pickle.dumps(sampler))
        assert isinstance(copy, getattr(samplers, name))
        assert isinstance(copy, getattr(uniform_sampler, name))
        assert isinstance(sampler, getattr(uniform_sampler, name))
        assert type(copy) is type(sampler) and len(copy) == len(sampler)
        # The copy carries the generator state: it draws the same batches as the original.
        assert _draws(copy) == _draws(sampler)


@pytest.mark.parametrize("name", NAMES_16)
def test_a_pickle_naming_the_1_6_path_still_loads(monkeypatch, name):
    sampler = next(s for s in _instances(monkeypatch) if type(s).__name__ == name)
    # Protocol 2 writes the class as "module\nname\n": rewrite it to the 1.6 module path.
    data = pickle.dumps(sampler, protocol=2)
    assert b"opacus.data_loader.samplers\n" in data
    old = data.replace(b"opacus.data_loader.samplers\n", b"opacus.utils.uniform_sampler\n")
    copy = pickle.loads(old)
    assert type(copy) is getattr(samplers, name)
    assert _draws(copy) == _draws(sampler)

"""DPDataLoader: Poisson batches, empty batches with the right shapes/dtypes, conversions."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
    TensorDataset,
)
from torch.utils.data._utils.collate import default_collate

from opacus.data_loader import (
    CollateFnWithEmpty,
    DPDataLoader,
    dtype_safe,
    shape_safe,
    switch_generator,
    wrap_collate_with_empty,
)
from opacus.utils.uniform_sampler import UniformWithReplacementSampler


def _dataset(n=10):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 4, generator=g), torch.arange(n) % 3)


def _all_empty_batches(dl):
    return [b for b in dl if b[0].shape[0] == 0]


def test_batches_are_the_sampled_indices():
    ds = _dataset(30)
    dl = DPDataLoader(ds, sample_rate=0.2, generator=torch.Generator().manual_seed(4))
    ref = UniformWithReplacementSampler(
        num_samples=30, sample_rate=0.2, generator=torch.Generator().manual_seed(4)
    )
    assert len(dl) == 5
    for (x, y), idx in zip(dl, ref):
        torch.testing.assert_close(x, ds.tensors[0][idx])
        torch.testing.assert_close(y, ds.tensors[1][idx])


def test_mean_batch_size_is_expected_batch_size():
    ds = _dataset(50)
    q = 0.1
    dl = DPDataLoader(ds, sample_rate=q, generator=torch.Generator().manual_seed(0))
    sizes = np.array([len(y) for _ in range(40) for _, y in dl])
    assert abs(sizes.mean() - q * 50) < 4 * np.sqrt(50 * q * (1 - q) / len(sizes))


def test_empty_batch_shapes_and_dtypes():
    ds = _dataset(4)
    dl = DPDataLoader(ds, sample_rate=0.01, generator=torch.Generator().manual_seed(0))
    empties = _all_empty_batches(dl)
    assert len(empties) > 50
    x, y = empties[0]
    assert x.shape == (0, 3, 4) and x.dtype == torch.float32
    assert y.shape == (0,) and y.dtype == torch.int64
    # An empty batch goes through a model and loss without special casing.
    out = torch.nn.Linear(4, 3)(x).sum(dim=1)
    loss = torch.nn.functional.cross_entropy(out, y, reduction="sum")
    assert loss.item() == 0


def test_empty_batch_not_batch_first():
    dl = DPDataLoader(
        _dataset(4),
        sample_rate=0.01,
        batch_first=False,
        generator=torch.Generator().manual_seed(0),
    )
    x, y = _all_empty_batches_any(dl)[0]
    assert x.shape == (3, 0, 4) and y.shape == (0,)


def _all_empty_batches_any(dl):
    return [b for b in dl if b[1].numel() == 0]


def test_rand_on_empty_gives_one_random_sample():
    dl = DPDataLoader(
        _dataset(4),
        sample_rate=0.01,
        rand_on_empty=True,
        generator=torch.Generator().manual_seed(0),
    )
    shapes = {tuple(x.shape) for x, _ in dl}
    assert (1, 3, 4) in shapes


class _DictDataset(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"img": torch.full((2,), float(i), dtype=torch.float16), "label": i, "w": 0.5}


class _ScalarDataset(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.tensor([i, i], dtype=torch.int32)


def test_dict_and_python_scalar_fields_match_default_collate_dtypes():
    ds = _DictDataset()
    dl = DPDataLoader(ds, sample_rate=0.01, generator=torch.Generator().manual_seed(0))
    empty = next(b for b in dl if b["img"].shape[0] == 0)
    full = default_collate([ds[0], ds[1]])
    assert set(empty) == {"img", "label", "w"}
    for k in full:
        assert empty[k].dtype == full[k].dtype, k
        assert empty[k].shape == (0, *full[k].shape[1:]), k


def test_single_tensor_samples():
    dl = DPDataLoader(
        _ScalarDataset(), sample_rate=0.01, generator=torch.Generator().manual_seed(0)
    )
    empty = next(b for b in dl if b.shape[0] == 0)
    assert torch.is_tensor(empty) and empty.shape == (0, 2) and empty.dtype == torch.int32


_DTYPES = [torch.float32, torch.float64, torch.int64, torch.int8, torch.bool, torch.bfloat16]


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=3),
    dtype_ids=st.lists(st.integers(0, len(_DTYPES) - 1), min_size=3, max_size=3),
    batch_first=st.booleans(),
)
def test_collate_with_empty_matches_default_collate(shapes, dtype_ids, batch_first):
    sample = tuple(torch.zeros(s, dtype=_DTYPES[d]) for s, d in zip(shapes, dtype_ids))
    fn = wrap_collate_with_empty(
        collate_fn=None,
        batch_first=batch_first,
        sample_empty_shapes=[shape_safe(f) for f in sample],
        dtypes=[dtype_safe(f) for f in sample],
    )
    empty = fn([])
    full = fn([sample, sample])  # default_collate: (2, *shape)
    assert len(empty) == len(sample)
    for e, f in zip(empty, full):
        assert e.dtype == f.dtype
        if batch_first or f.dim() == 1:
            assert e.shape == (0, *f.shape[1:])
        else:
            assert e.shape == (f.shape[1], 0, *f.shape[2:])


def test_collate_with_empty_uses_given_collate_and_needs_shapes():
    calls = []

    def collate(batch):
        calls.append(len(batch))
        return default_collate(batch)

    fn = CollateFnWithEmpty(collate)
    fn([(torch.ones(2),)])
    assert calls == [1]
    with pytest.raises(ValueError, match="sample_empty_shapes"):
        fn([])


def test_shape_and_dtype_safe():
    assert shape_safe(torch.zeros(2, 3)) == (2, 3)
    assert shape_safe(3) == () and shape_safe(np.zeros((4,))) == (4,)
    assert dtype_safe(torch.zeros(1, dtype=torch.int16)) == torch.int16
    assert dtype_safe(3) is int and dtype_safe(2.0) is float


def test_from_data_loader_keeps_settings():
    ds = _dataset(40)

    def collate(batch):
        x, y = default_collate(batch)
        return x * 2, y

    dl = DataLoader(ds, batch_size=8, collate_fn=collate, pin_memory=False, worker_init_fn=print)
    dp = DPDataLoader.from_data_loader(dl, generator=torch.Generator().manual_seed(0))
    assert isinstance(dp, DPDataLoader)
    assert dp.sample_rate == pytest.approx(1 / 5) and len(dp) == 5
    assert dp.dataset is ds and dp.worker_init_fn is print
    x, y = next(b for b in dp if len(b[1]) > 0)
    idx = [int((ds.tensors[0] == xi / 2).all(-1).all(-1).nonzero()) for xi in x]
    torch.testing.assert_close(ds.tensors[1][idx], y)


def test_from_data_loader_workers():
    ds = _dataset(20)
    dl = DataLoader(ds, batch_size=5, num_workers=2, prefetch_factor=3, timeout=20)
    dp = DPDataLoader.from_data_loader(dl, generator=torch.Generator().manual_seed(0))
    assert dp.num_workers == 2 and dp.prefetch_factor == 3 and dp.timeout == 20
    ref = UniformWithReplacementSampler(
        num_samples=20, sample_rate=0.25, generator=torch.Generator().manual_seed(0)
    )
    for (_, y), idx in zip(dp, ref):
        torch.testing.assert_close(y, ds.tensors[1][idx])


def test_from_data_loader_rejects_custom_batch_sampler_and_iterable():
    class MyBatchSampler(BatchSampler):
        pass

    ds = _dataset(10)
    dl = DataLoader(ds, batch_sampler=MyBatchSampler(SequentialSampler(ds), 2, False))
    with pytest.raises(ValueError, match="custom batch_sampler"):
        DPDataLoader.from_data_loader(dl)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(ValueError, match="IterableDataset"):
        DPDataLoader.from_data_loader(DataLoader(Stream(), batch_size=2))
    with pytest.raises(ValueError, match="IterableDataset"):
        DPDataLoader(Stream(), sample_rate=0.1)


def test_forbidden_kwargs_and_drop_last_warning():
    ds = _dataset(10)
    with pytest.raises(ValueError, match="batch_size"):
        DPDataLoader(ds, sample_rate=0.1, batch_size=4)
    with pytest.warns(UserWarning, match="drop_last"):
        DPDataLoader(ds, sample_rate=0.1, drop_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DPDataLoader(ds, sample_rate=0.1)


def test_from_dp_data_loader_keeps_sample_rate():
    dp = DPDataLoader(_dataset(10), sample_rate=0.3)
    again = DPDataLoader.from_data_loader(dp)
    assert again.sample_rate == 0.3


def test_switch_generator():
    ds = _dataset(30)
    dl = DPDataLoader(ds, sample_rate=0.2, generator=torch.Generator().manual_seed(1))
    switch_generator(data_loader=dl, generator=torch.Generator().manual_seed(9))
    ref = DPDataLoader(ds, sample_rate=0.2, generator=torch.Generator().manual_seed(9))
    for (x, _), (x_ref, _) in zip(dl, ref):
        torch.testing.assert_close(x, x_ref)

    plain = DataLoader(ds, batch_size=4, shuffle=True)
    g = torch.Generator()
    switch_generator(data_loader=plain, generator=g)
    assert plain.sampler.generator is g
    with pytest.raises(ValueError, match="generator"):
        switch_generator(data_loader=DataLoader(ds, batch_size=None), generator=g)

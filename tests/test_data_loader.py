"""DPDataLoader: Poisson batches, empty batches with the right structure, conversions."""

import collections
import logging
import math

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
    _poisson_sample_rate,
    dtype_safe,
    shape_safe,
    switch_generator,
    wrap_collate_with_empty,
)
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

LOGGER = "opacus.data_loader"


def _dataset(n=10):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 4, generator=g), torch.arange(n) % 3)


def _first_batch_empty_warnings(caplog):
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and "First batch is empty" in r.message
    ]


# ------------------------------------------------------------------ DPDataLoader sampling
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


def test_user_built_loader_exposes_its_real_sample_rate():
    # Issue 16 item 6: DPDataLoader(sample_rate=0.35) has int(1/0.35) = 2 batches per epoch, so
    # 1 / len(loader) = 0.5 is not its rate; the rate to account is the attribute, 0.35.
    n, q = 40, 0.35
    ds = _dataset(n)
    dl = DPDataLoader(ds, sample_rate=q, generator=torch.Generator().manual_seed(0))
    assert len(dl) == 2
    assert dl.sample_rate == q and dl.batch_sampler.sample_rate == q
    assert _poisson_sample_rate(dl) == q
    # Closed-form oracle: each sample joins each batch w.p. q (Binomial over all draws).
    draws = [y for _ in range(300) for _, y in dl]
    rate = sum(len(y) for y in draws) / (n * len(draws))
    assert abs(rate - q) < 4 * math.sqrt(q * (1 - q) / (n * len(draws)))
    assert _poisson_sample_rate(DataLoader(ds, batch_size=4)) is None


def test_distributed_loader_uses_the_rank_shard(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    ds = _dataset(20)
    dl = DPDataLoader(ds, sample_rate=0.5, distributed=True)
    assert dl.distributed and dl.sample_rate == 0.5 and len(dl) == 2
    shard = set(dl.batch_sampler._shard().tolist())
    for x, _ in dl:
        for row in x:
            (i,) = (ds.tensors[0] == row).all(-1).all(-1).nonzero()[0].tolist()
            assert i in shard


# ------------------------------------------------------------------ empty batches end to end
class _VectorsAndLabels(Dataset):
    """10 items of (7 floats, Python int label)."""

    def __init__(self):
        self.x = torch.randn(10, 7, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return self.x[i], i % 2


def test_first_batch_empty_end_to_end(caplog):
    # Contract: q = 0.05, generator seeded 0 -> the first Poisson batch is empty.
    ds = _VectorsAndLabels()
    dl = DPDataLoader(ds, sample_rate=0.05, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        batches = list(dl)
    first = batches[0]
    assert isinstance(first, list) and len(first) == 2
    assert first[0].dtype == torch.float32 and first[0].shape == (0, 7)
    assert first[1].dtype == torch.int64 and first[1].shape == (0,)
    assert len(_first_batch_empty_warnings(caplog)) == 1
    first_full = next(i for i, (_, y) in enumerate(batches) if len(y) > 0)
    for x, y in batches[first_full:]:
        assert x.shape[1:] == (7,) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Empty batches after the first non-empty one follow the learned structure, silently.
    later_empty = [b for b in batches[first_full:] if len(b[1]) == 0]
    assert later_empty
    for x, y in later_empty:
        assert x.shape == (0, 7) and y.shape == (0,)


def test_empty_batches_run_through_a_model():
    ds = _dataset(4)
    dl = DPDataLoader(ds, sample_rate=0.01, generator=torch.Generator().manual_seed(0))
    empties = [b for b in dl if b[1].numel() == 0]
    assert len(empties) > 50
    for x, y in empties:
        assert x.shape == (0, 3, 4) and x.dtype == torch.float32
        assert y.shape == (0,) and y.dtype == torch.int64
        out = torch.nn.Linear(4, 3)(x).sum(dim=1)
        assert torch.nn.functional.cross_entropy(out, y, reduction="sum").item() == 0


def test_empty_batch_not_batch_first():
    def time_major(batch):
        x, y = default_collate(batch)
        return x.transpose(0, 1), y

    dl = DPDataLoader(
        _dataset(4),
        sample_rate=0.2,
        batch_first=False,
        collate_fn=time_major,
        generator=torch.Generator().manual_seed(0),
    )
    batches = [b for _ in range(10) for b in dl]
    seen_full = False
    for x, y in batches:
        if y.numel() > 0:
            seen_full = True
            assert x.shape[0] == 3 and x.shape[1] == y.shape[0]
        elif seen_full:
            assert x.shape == (3, 0, 4) and y.shape == (0,)
    assert seen_full and any(y.numel() == 0 for _, y in batches)


def test_rand_on_empty_gives_one_random_sample():
    dl = DPDataLoader(
        _dataset(4),
        sample_rate=0.2,
        rand_on_empty=True,
        generator=torch.Generator().manual_seed(0),
    )
    batches = [b for _ in range(10) for b in dl]
    first_full = next(i for i, (_, y) in enumerate(batches) if y.numel() > 0)
    singles = [b for b in batches[first_full:] if b[0].shape[0] == 1]
    randoms = [
        (x, y) for x, y in singles if not (x == _dataset(4).tensors[0]).all(-1).all(-1).any()
    ]
    assert randoms, "an empty batch after the structure is known becomes one random sample"
    for x, y in randoms:
        assert x.shape == (1, 3, 4) and x.dtype == torch.float32 and y.shape == (1,)
        assert set(x.unique().tolist()) <= {0.0, 1.0} and set(y.tolist()) <= {0, 1}


class _DictDataset(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"img": torch.full((2,), float(i), dtype=torch.float16), "label": i, "w": 0.5}


class _TensorOnlyDataset(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.tensor([i, i], dtype=torch.int32)


def _loader_collate(dataset, **kwargs):
    return DPDataLoader(dataset, sample_rate=0.5, **kwargs).collate_fn


@pytest.mark.parametrize("first_empty", [True, False])
def test_dict_samples_match_default_collate(first_empty):
    ds = _DictDataset()
    fn = _loader_collate(ds)
    full = default_collate([ds[0], ds[1]])
    if not first_empty:
        fn([ds[3]])
    empty = fn([])
    assert isinstance(empty, dict) and set(empty) == {"img", "label", "w"}
    for k in full:
        assert empty[k].dtype == full[k].dtype, k
        assert empty[k].shape == (0, *full[k].shape[1:]), k


@pytest.mark.parametrize("first_empty", [True, False])
def test_single_tensor_samples(first_empty):
    fn = _loader_collate(_TensorOnlyDataset())
    if not first_empty:
        fn([_TensorOnlyDataset()[1]])
    empty = fn([])
    assert torch.is_tensor(empty) and empty.shape == (0, 2) and empty.dtype == torch.int32


def test_dp_data_loader_builds_the_fallback_from_sample_zero():
    class Mixed(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(2, 5, dtype=torch.float64), np.zeros(3, dtype=np.int16), 1.5

    fn = DPDataLoader(Mixed(), sample_rate=0.5).collate_fn
    assert isinstance(fn, CollateFnWithEmpty) and fn.collator_fn is default_collate
    assert fn.sample_empty_shapes == [(0, 2, 5), (0, 3), (0,)]
    assert fn.dtypes == [torch.float64, np.dtype("int16"), float]
    full = default_collate([Mixed()[0]])
    empty = fn([])
    assert isinstance(empty, list)
    for e, f in zip(empty, full):
        assert e.dtype == f.dtype and e.shape == (0, *f.shape[1:])


def test_drop_last_is_ignored_with_a_logged_warning(caplog):
    ds = _dataset(10)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dl = DPDataLoader(ds, sample_rate=0.1, drop_last=True)
    assert any("drop_last" in r.message for r in caplog.records if r.name == LOGGER)
    assert len(dl) == 10 and not dl.drop_last
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        DPDataLoader(ds, sample_rate=0.1)
    assert not caplog.records


def test_forbidden_kwargs():
    ds = _dataset(10)
    for kw in ("batch_size", "sampler", "batch_sampler", "shuffle"):
        with pytest.raises(ValueError, match=f"DPDataLoader.*{kw}="):
            DPDataLoader(ds, sample_rate=0.1, **{kw: None})


# ------------------------------------------------------------------ CollateFnWithEmpty
def _tensors_in(obj, seen=None):
    """Every tensor reachable from obj's attributes (containers walked)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not callable(obj):
        items = list(vars(obj).values())
    else:
        return []
    return [t for i in items for t in _tensors_in(i, seen)]


def test_none_collator_returns_the_batch_unchanged():
    fn = CollateFnWithEmpty(None)
    batch = [(torch.ones(2), 1), (torch.zeros(2), 0)]
    assert fn(batch) is batch


def test_learns_structure_and_keeps_no_data():
    fn = CollateFnWithEmpty(default_collate)
    sample = {"x": torch.randn(3), "pair": (torch.ones(2, 2, dtype=torch.float64), [5, 6])}
    full = fn([sample, sample, sample])
    assert not _tensors_in(vars(fn)), "the collate function must not keep a copy of the data"
    empty = fn([])
    assert isinstance(empty, dict) and set(empty) == {"x", "pair"}
    assert isinstance(empty["pair"], list) and isinstance(empty["pair"][1], list)
    assert empty["x"].shape == (0, 3) and empty["x"].dtype == full["x"].dtype
    assert empty["pair"][0].shape == (0, 2, 2) and empty["pair"][0].dtype == torch.float64
    assert [t.shape for t in empty["pair"][1]] == [(0,), (0,)]
    # A second empty batch is a fresh object.
    again = fn([])
    assert again is not empty and again["x"] is not empty["x"]


def test_structure_is_learned_from_the_first_non_empty_batch_only():
    outputs = iter([torch.zeros(4, 2), (torch.zeros(4, 5),)])
    fn = CollateFnWithEmpty(lambda batch: next(outputs))
    fn([1])
    fn([1])
    assert fn([]).shape == (0, 2)


def test_namedtuple_and_tuple_containers_are_kept():
    Pair = collections.namedtuple("Pair", ["a", "b"])
    fn = CollateFnWithEmpty(lambda b: (Pair(torch.zeros(2, 1), torch.zeros(2)), torch.zeros(2)))
    fn([0, 1])
    empty = fn([])
    assert type(empty) is tuple and type(empty[0]) is Pair
    assert empty[0].a.shape == (0, 1) and empty[0].b.shape == (0,) and empty[1].shape == (0,)


def test_learned_device_is_kept():
    fn = CollateFnWithEmpty(lambda b: torch.zeros(len(b), 3, device="meta"))
    fn([0, 1])
    empty = fn([])
    assert empty.device.type == "meta" and empty.shape == (0, 3)


def test_unsupported_batch_type_only_when_an_empty_batch_must_be_built():
    fn = CollateFnWithEmpty(lambda b: (torch.zeros(len(b), 2), ["name"] * len(b)))
    fn(["a", "b"])  # non-empty batches pass through whatever they contain
    with pytest.raises(TypeError, match="Unsupported batch type"):
        fn([])
    fn = CollateFnWithEmpty(lambda b: "a string")
    fn([1])
    with pytest.raises(TypeError, match="Unsupported batch type"):
        fn([])


def test_first_batch_empty_fallback(caplog):
    shapes, dtypes = [(0, 3), (0,)], [torch.float32, torch.int64]
    fn = CollateFnWithEmpty(
        default_collate,
        batch_first=False,
        rand_on_empty=True,
        sample_empty_shapes=shapes,
        dtypes=dtypes,
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first, second = fn([]), fn([])
    # Full shapes (the 0 included); batch_first and rand_on_empty do not apply.
    for out in (first, second):
        assert isinstance(out, list)
        assert [tuple(t.shape) for t in out] == shapes and [t.dtype for t in out] == dtypes
        assert all((t == 0).all() for t in out)
    assert len(_first_batch_empty_warnings(caplog)) == 2, "one warning per such batch"
    # A non-empty batch then teaches the structure; no more warnings.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fn([(torch.ones(3), 1)])
        x, y = fn([])
    assert not _first_batch_empty_warnings(caplog)
    assert x.shape == (1, 1) and y.shape == (1,)  # batch_first=False (dim 1), rand_on_empty


def test_first_batch_empty_without_shapes_returns_empty_list(caplog):
    for kwargs in ({}, {"sample_empty_shapes": [(0, 2)]}, {"dtypes": [torch.float32]}):
        fn = CollateFnWithEmpty(default_collate, **kwargs)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert fn([]) == []
    assert len(_first_batch_empty_warnings(caplog)) == 3


def test_wrap_collate_with_empty_passes_its_arguments():
    def collate(batch):
        return default_collate(batch)

    fn = wrap_collate_with_empty(
        collate_fn=collate,
        batch_first=False,
        rand_on_empty=True,
        sample_empty_shapes=[(0, 2)],
        dtypes=[torch.int8],
    )
    assert isinstance(fn, CollateFnWithEmpty)
    assert fn.collator_fn is collate and fn.batch_first is False and fn.rand_on_empty is True
    assert fn.sample_empty_shapes == [(0, 2)] and fn.dtypes == [torch.int8]


_DTYPES = [torch.float32, torch.float64, torch.int64, torch.int8, torch.bool, torch.bfloat16]
_LEAF = st.tuples(
    st.lists(st.integers(1, 3), min_size=0, max_size=3), st.sampled_from(range(len(_DTYPES)))
)
_TREE = st.recursive(
    _LEAF,
    lambda kids: st.lists(kids, min_size=1, max_size=3)
    | st.lists(kids, min_size=1, max_size=3).map(tuple)
    | st.dictionaries(st.text("abc", min_size=1, max_size=2), kids, min_size=1, max_size=3),
    max_leaves=6,
)


def _build(spec, batch, batch_first):
    """Tree of tensors from a spec; the batch dimension is 0 (batch_first) or 1."""
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], int):
        shape, d = list(spec[0]), spec[1]
        dim = 0 if batch_first or not shape else 1
        return torch.zeros([*shape[:dim], batch, *shape[dim:]], dtype=_DTYPES[d])
    if isinstance(spec, dict):
        return {k: _build(v, batch, batch_first) for k, v in spec.items()}
    return type(spec)(_build(s, batch, batch_first) for s in spec)


def _assert_same_empty(out, ref):
    assert type(out) is type(ref)
    if torch.is_tensor(ref):
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    elif isinstance(ref, dict):
        assert list(out) == list(ref)
        for k in ref:
            _assert_same_empty(out[k], ref[k])
    else:
        assert len(out) == len(ref)
        for o, r in zip(out, ref):
            _assert_same_empty(o, r)


@settings(max_examples=30, deadline=None)
@given(spec=_TREE, batch=st.integers(1, 4), batch_first=st.booleans())
def test_empty_batch_is_the_collated_structure_with_no_rows(spec, batch, batch_first):
    full = _build(spec, batch, batch_first)
    fn = CollateFnWithEmpty(lambda b: full, batch_first=batch_first)
    assert fn([object()] * batch) is full
    # Oracle: the same tree built with a batch of 0.
    _assert_same_empty(fn([]), _build(spec, 0, batch_first))


def test_shape_and_dtype_safe():
    assert shape_safe(torch.zeros(2, 3)) == (2, 3)
    assert shape_safe(3) == () and shape_safe(np.zeros((4,))) == (4,)
    assert dtype_safe(torch.zeros(1, dtype=torch.int16)) == torch.int16
    assert dtype_safe(3) is int and dtype_safe(2.0) is float


# ------------------------------------------------------------------ from_data_loader
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


@settings(max_examples=40, deadline=None)
@given(num_batches=st.integers(1, 3000) | st.sampled_from([93, 99, 105, 117, 186, 211]))
def test_from_data_loader_keeps_the_epoch_length(num_batches):
    # sample_rate ~ 1 / len(data_loader), and int(1 / sample_rate) batches per epoch must give
    # back len(data_loader) even where 1 / (1 / L) < L in floating point (L = 93, 99, ...).
    dl = DataLoader(TensorDataset(torch.zeros(num_batches)), batch_size=1)
    dp = DPDataLoader.from_data_loader(dl)
    assert len(dp) == num_batches
    assert dp.sample_rate <= 1 / num_batches
    assert dp.sample_rate == pytest.approx(1 / num_batches, rel=1e-14)


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


def test_from_dp_data_loader_keeps_sample_rate():
    dp = DPDataLoader(_dataset(10), sample_rate=0.3)
    again = DPDataLoader.from_data_loader(dp)
    assert again.sample_rate == 0.3 and len(again) == 3


# ------------------------------------------------------------------ switch_generator
def _read_all(dl):
    return torch.cat([x for x, _ in dl])


def test_switch_same_seed_reads_the_same_data():
    ds = _dataset(30)
    ref = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1337))
    other = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))
    switched = switch_generator(data_loader=other, generator=torch.Generator().manual_seed(1337))
    torch.testing.assert_close(_read_all(switched), _read_all(ref))
    # ...and differs from another seed (the test can fail).
    assert not torch.equal(_read_all(ref), _read_all(other))


def test_switch_returns_a_new_loader_with_the_same_settings():
    ds = _dataset(30)

    def collate(batch):
        return default_collate(batch)

    old = DataLoader(
        ds,
        batch_size=4,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        num_workers=1,
        prefetch_factor=3,
        timeout=7,
        worker_init_fn=print,
        persistent_workers=True,
        multiprocessing_context="spawn",
    )
    g = torch.Generator()
    new = switch_generator(data_loader=old, generator=g)
    assert new is not old and type(new) is DataLoader
    assert new.generator is g and new.batch_sampler is old.batch_sampler
    assert new.batch_sampler.sampler.generator is g
    assert new.dataset is ds and new.collate_fn is collate and len(new) == len(old) == 7
    for attr in (
        "num_workers",
        "pin_memory",
        "timeout",
        "worker_init_fn",
        "multiprocessing_context",
        "prefetch_factor",
        "persistent_workers",
    ):
        assert getattr(new, attr) == getattr(old, attr), attr


def test_switch_poisson_loader():
    ds = _dataset(30)
    switched = [
        switch_generator(
            data_loader=DPDataLoader(
                ds, sample_rate=0.2, generator=torch.Generator().manual_seed(s)
            ),
            generator=torch.Generator().manual_seed(9),
        )
        for s in (1, 2)
    ]
    for dl in switched:
        assert dl.generator is dl.batch_sampler.generator
        assert _poisson_sample_rate(dl) == 0.2 and len(dl) == 5
        assert isinstance(dl.collate_fn, CollateFnWithEmpty)
    a, b = ([[y.tolist() for _, y in dl] for _ in range(3)] for dl in switched)
    assert a == b


def test_switch_generator_rejects_loaders_without_a_generator():
    ds = _dataset(10)
    g = torch.Generator()
    with pytest.raises(ValueError, match="switch_generator.*SequentialSampler"):
        switch_generator(data_loader=DataLoader(ds, batch_size=2), generator=g)
    with pytest.raises(ValueError, match="switch_generator"):
        switch_generator(data_loader=DataLoader(ds, batch_size=None), generator=g)

    class Custom:
        def __iter__(self):
            yield [0, 1]

        def __len__(self):
            return 1

    with pytest.raises(ValueError, match="switch_generator.*Custom"):
        switch_generator(data_loader=DataLoader(ds, batch_sampler=Custom()), generator=g)


def test_first_batch_empty_with_a_string_field_is_a_clear_error(caplog):
    class Named(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(2), f"item{i}"

    fn = DPDataLoader(Named(), sample_rate=0.5).collate_fn
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with pytest.raises(TypeError, match="CollateFnWithEmpty: Unsupported batch type"):
            fn([])
    # Non-empty batches with strings are collated as usual.
    x, names = fn([Named()[0], Named()[2]])
    assert x.shape == (2, 2) and list(names) == ["item0", "item2"]

"""Data loaders with Poisson sampling (the sampling DP-SGD's privacy accounting assumes).

A Poisson batch can be empty. ``default_collate`` cannot build a batch from nothing, so the
collate function is wrapped: an empty batch becomes, for each field of a sample, a tensor of shape
``(0, *sample_shape)`` with the sample's dtype, which every ``nn`` layer and loss accepts.
"""

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from opacus.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CollateFnWithEmpty",
    "DPDataLoader",
    "DistributedUniformWithReplacementSampler",
    "UniformWithReplacementSampler",
    "dtype_safe",
    "shape_safe",
    "switch_generator",
    "wrap_collate_with_empty",
]

# default_collate turns Python scalars into these tensor dtypes; empty batches must match.
_PY_TO_TORCH_DTYPE = {bool: torch.bool, int: torch.int64, float: torch.float64}


def shape_safe(x: Any) -> Tuple:
    """Shape of a sample field: ``x.shape`` for tensors/arrays, ``()`` for scalars."""
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else ()


def dtype_safe(x: Any) -> Union[torch.dtype, Type]:
    """dtype of a sample field: ``x.dtype`` for tensors, the Python type for scalars."""
    dtype = getattr(x, "dtype", None)
    return dtype if dtype is not None else type(x)


def _as_torch_dtype(dtype: Union[torch.dtype, Type]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _PY_TO_TORCH_DTYPE:
        return _PY_TO_TORCH_DTYPE[dtype]
    try:  # numpy dtypes
        return torch.from_numpy(__import__("numpy").empty(0, dtype=dtype)).dtype
    except Exception:
        return torch.get_default_dtype()


def _empty_field(shape: Tuple, dtype, *, batch_first: bool, rand_on_empty: bool) -> torch.Tensor:
    dtype = _as_torch_dtype(dtype)
    batch = 1 if rand_on_empty else 0
    if batch_first or len(shape) == 0:
        full_shape = (batch, *shape)
    else:
        full_shape = (shape[0], batch, *shape[1:])
    if rand_on_empty and dtype.is_floating_point:
        return torch.rand(full_shape, dtype=dtype)
    return torch.zeros(full_shape, dtype=dtype)


class CollateFnWithEmpty:
    """Collate function that also handles empty batches.

    Non-empty batches go to ``collator_fn`` (``default_collate`` if None). An empty batch becomes
    one tensor per sample field, of shape ``(0, *shape)`` (``(shape[0], 0, *shape[1:])`` when
    ``batch_first=False``) and the field's dtype. With ``rand_on_empty=True`` it is instead a batch
    of one data-independent random input (uniform floats, zero integers), for models that cannot
    run on an empty batch; it carries no information about the dataset.
    """

    def __init__(
        self,
        collator_fn: Optional[Callable[[List[Any]], Any]],
        batch_first: bool = True,
        rand_on_empty: bool = False,
        sample_empty_shapes: Optional[Sequence[Tuple]] = None,
        dtypes: Optional[Sequence[Union[torch.dtype, Type]]] = None,
    ) -> None:
        self.collator_fn = collator_fn if collator_fn is not None else default_collate
        self.batch_first = batch_first
        self.rand_on_empty = rand_on_empty
        self.sample_empty_shapes = sample_empty_shapes
        self.dtypes = dtypes
        # How an empty batch is laid out: a list of fields (default), one bare tensor when each
        # sample is a single tensor, or a dict when samples are dicts (set by DPDataLoader).
        self._keys: Optional[List[Any]] = None
        self._single_field = False

    def __call__(self, batch: List[Any]) -> Any:
        if len(batch) > 0:
            return self.collator_fn(batch)
        return self._empty_batch()

    def _empty_batch(self) -> Any:
        if self.sample_empty_shapes is None or self.dtypes is None:
            raise ValueError(
                "Poisson sampling produced an empty batch but CollateFnWithEmpty was built without "
                "sample_empty_shapes/dtypes: pass them (shape_safe/dtype_safe of each field of a "
                "sample), as DPDataLoader does."
            )
        make = [
            _empty_field(s, d, batch_first=self.batch_first, rand_on_empty=self.rand_on_empty)
            for s, d in zip(self.sample_empty_shapes, self.dtypes)
        ]
        if self._keys is not None:
            return dict(zip(self._keys, make))
        if self._single_field:
            return make[0]
        return make


def wrap_collate_with_empty(
    *,
    collate_fn: Optional[Callable[[List[Any]], Any]],
    batch_first: bool = True,
    rand_on_empty: bool = False,
    sample_empty_shapes: Optional[Sequence[Tuple]] = None,
    dtypes: Optional[Sequence[Union[torch.dtype, Type]]] = None,
) -> CollateFnWithEmpty:
    """Wrap ``collate_fn`` so that empty batches become correctly shaped empty tensors."""
    return CollateFnWithEmpty(
        collate_fn,
        batch_first=batch_first,
        rand_on_empty=rand_on_empty,
        sample_empty_shapes=sample_empty_shapes,
        dtypes=dtypes,
    )


def _collate_for_dataset(
    dataset: Dataset, collate_fn, *, batch_first: bool, rand_on_empty: bool
) -> CollateFnWithEmpty:
    # Sample 0 tells the empty batch which fields, shapes and dtypes to produce.
    sample = dataset[0]
    keys, single = None, False
    if isinstance(sample, Mapping):
        keys = list(sample.keys())
        fields = [sample[k] for k in keys]
    elif isinstance(sample, (tuple, list)):
        fields = list(sample)
    else:
        fields, single = [sample], True
    wrapped = wrap_collate_with_empty(
        collate_fn=collate_fn,
        batch_first=batch_first,
        rand_on_empty=rand_on_empty,
        sample_empty_shapes=[shape_safe(f) for f in fields],
        dtypes=[dtype_safe(f) for f in fields],
    )
    wrapped._keys = keys
    wrapped._single_field = single
    return wrapped


class DPDataLoader(DataLoader):
    """``DataLoader`` drawing Poisson batches: each sample is in each batch w.p. ``sample_rate``.

    The expected batch size is ``sample_rate * len(dataset)``; one epoch is
    ``round(1 / sample_rate)`` batches. With ``distributed=True`` each rank Poisson-samples its own
    shard of the dataset (``DistributedUniformWithReplacementSampler``).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        drop_last: bool = False,
        generator=None,
        distributed: bool = False,
        batch_first: bool = True,
        rand_on_empty: bool = False,
        **kwargs,
    ):
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "DPDataLoader needs a map-style dataset (with __len__ and __getitem__): Poisson "
                "sampling draws indices. IterableDataset is not supported."
            )
        for forbidden in ("batch_size", "batch_sampler", "sampler", "shuffle"):
            if forbidden in kwargs:
                raise ValueError(
                    f"DPDataLoader chooses batches by Poisson sampling; do not pass {forbidden}= "
                    "(set sample_rate = expected_batch_size / len(dataset) instead)."
                )
        self.sample_rate = sample_rate
        self.distributed = distributed
        if distributed:
            batch_sampler = DistributedUniformWithReplacementSampler(
                total_size=len(dataset), sample_rate=sample_rate, generator=generator
            )
        else:
            batch_sampler = UniformWithReplacementSampler(
                num_samples=len(dataset), sample_rate=sample_rate, generator=generator
            )
        if drop_last:
            warnings.warn(
                "DPDataLoader ignores drop_last=True: dropping a Poisson batch would change the "
                "sampling the privacy accounting assumes.",
                stacklevel=2,
            )
        super().__init__(
            dataset=dataset,
            batch_sampler=batch_sampler,
            collate_fn=_collate_for_dataset(
                dataset, collate_fn, batch_first=batch_first, rand_on_empty=rand_on_empty
            ),
            **kwargs,
        )
        # Not handed to DataLoader: it would draw its worker base seed from the same stream,
        # so batches would no longer be exactly the sampler's draws from `generator`.

    @classmethod
    def from_data_loader(
        cls,
        data_loader: DataLoader,
        *,
        distributed: bool = False,
        generator=None,
        batch_first: bool = True,
        rand_on_empty: bool = False,
    ):
        """A ``DPDataLoader`` over the same dataset with ``sample_rate = 1 / len(data_loader)``.

        The expected batch size thus equals the original batch size; dataset, collate_fn and the
        worker settings (num_workers, pin_memory, timeout, worker_init_fn, ...) are kept.
        """
        if isinstance(data_loader.dataset, IterableDataset):
            raise ValueError(
                "Poisson sampling needs a map-style dataset; the data loader wraps an "
                "IterableDataset. Use a Dataset with __len__/__getitem__."
            )
        batch_sampler = data_loader.batch_sampler
        if isinstance(
            batch_sampler, (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler)
        ):
            sample_rate = batch_sampler.sample_rate
        elif batch_sampler is None or type(batch_sampler) is BatchSampler:
            if len(data_loader) == 0:
                raise ValueError("The data loader yields no batches: cannot derive a sample rate.")
            sample_rate = 1.0 / len(data_loader)
        else:
            raise ValueError(
                f"The data loader uses a custom batch_sampler ({type(batch_sampler).__name__}): "
                "its batches cannot be turned into Poisson batches. Build the DPDataLoader "
                "directly with DPDataLoader(dataset, sample_rate=...)."
            )
        kwargs = _worker_settings(data_loader)
        collate_fn = data_loader.collate_fn
        if isinstance(collate_fn, CollateFnWithEmpty):
            collate_fn = collate_fn.collator_fn
        return cls(
            dataset=data_loader.dataset,
            sample_rate=sample_rate,
            collate_fn=collate_fn,
            generator=generator if generator is not None else _sampler_generator(data_loader),
            distributed=distributed,
            batch_first=batch_first,
            rand_on_empty=rand_on_empty,
            **kwargs,
        )


def _worker_settings(data_loader: DataLoader) -> dict:
    """The ``DataLoader`` keyword arguments that say how ``data_loader`` loads its batches
    (workers, pinning, timeouts), for a loader that re-batches the same dataset."""
    kwargs = dict(
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context,
        persistent_workers=data_loader.persistent_workers,
    )
    # DataLoader rejects prefetch_factor without workers.
    if data_loader.num_workers > 0:
        kwargs["prefetch_factor"] = data_loader.prefetch_factor
    if getattr(data_loader, "pin_memory_device", ""):
        kwargs["pin_memory_device"] = data_loader.pin_memory_device
    return kwargs


def _sampler_generator(data_loader: DataLoader):
    if isinstance(data_loader, DPDataLoader):
        return data_loader.batch_sampler.generator
    return data_loader.generator


def switch_generator(*, data_loader: DataLoader, generator):
    """Return a data loader over the same batches whose sampler draws from ``generator``.

    Poisson loaders get the generator on their batch sampler; ordinary loaders on their sampler
    (e.g. ``RandomSampler``). Used by secure mode to swap in a cryptographically seeded generator.
    """
    batch_sampler = data_loader.batch_sampler
    if isinstance(
        batch_sampler, (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler)
    ):
        batch_sampler.generator = generator
    elif isinstance(batch_sampler, BatchSampler) and hasattr(batch_sampler.sampler, "generator"):
        batch_sampler.sampler.generator = generator
    elif hasattr(batch_sampler, "sampler") and hasattr(batch_sampler.sampler, "generator"):
        batch_sampler.sampler.generator = generator
    else:
        raise ValueError(
            f"Cannot switch the generator of a data loader whose batch sampler is "
            f"{type(batch_sampler).__name__}: it exposes no generator."
        )
    return data_loader

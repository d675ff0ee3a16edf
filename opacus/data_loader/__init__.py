"""Data loaders with Poisson sampling (the sampling DP-SGD's privacy accounting assumes).

A Poisson batch can be empty. ``default_collate`` cannot build a batch from nothing, so the
collate function is wrapped (:class:`CollateFnWithEmpty`): it learns the *structure* of the
collated batches (containers, keys, tensor shapes, dtypes and devices; never their values) from
the first non-empty batch, and turns an empty batch into the same structure with a batch
dimension of 0, which every ``nn`` layer and loss accepts.

The sampling rate a :class:`DPDataLoader` really uses is its ``sample_rate`` attribute (also on its
batch sampler): the privacy accountant must record that rate, not ``1 / len(loader)``.
"""

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from opacus.data_loader.samplers import (
    CyclicPoissonSampler,
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CollateFnWithEmpty",
    "CyclicPoissonDataLoader",
    "CyclicPoissonSampler",
    "DPDataLoader",
    "DistributedUniformWithReplacementSampler",
    "UniformWithReplacementSampler",
    "dtype_safe",
    "shape_safe",
    "switch_generator",
    "wrap_collate_with_empty",
]

_POISSON_SAMPLERS = (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler)

# default_collate turns Python scalars into these tensor dtypes; empty batches must match.
_PY_TO_TORCH_DTYPE = {bool: torch.bool, int: torch.int64, float: torch.float64}


def shape_safe(x: Any) -> Tuple:
    """Shape of a sample field: ``x.shape`` for tensors/arrays, ``()`` for scalars.

    Args:
        x: a field of one sample.

    Returns:
        its shape (``()`` for a scalar).
    """
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else ()


def dtype_safe(x: Any) -> Union[torch.dtype, Type]:
    """dtype of a sample field: ``x.dtype`` for tensors, the Python type for scalars.

    Args:
        x: a field of one sample.

    Returns:
        its dtype or Python type.
    """
    dtype = getattr(x, "dtype", None)
    return dtype if dtype is not None else type(x)


def _as_torch_dtype(dtype: Union[torch.dtype, Type]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _PY_TO_TORCH_DTYPE:
        return _PY_TO_TORCH_DTYPE[dtype]
    try:  # numpy dtypes (np.float32, np.dtype("int16"), ...)
        import numpy as np

        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except Exception as err:
        raise TypeError(
            f"CollateFnWithEmpty: Unsupported batch type {dtype!r} for an empty batch: only "
            "tensors, numpy arrays and Python bool/int/float fields can be made empty. Pass "
            "dtypes= with torch dtypes, or use a collate_fn whose batches are tensors."
        ) from err


# ------------------------------------------------------------------ batch structure
# A learned structure is a tree of tuples; leaves describe tensors (never their values):
#   ("tensor", shape, dtype, device) | ("mapping", keys, children)
#   | ("sequence", container_type, children) | ("unsupported", type)


def _structure_of(batch: Any):
    if torch.is_tensor(batch):
        return ("tensor", tuple(batch.shape), batch.dtype, batch.device)
    if isinstance(batch, Mapping):
        keys = list(batch.keys())
        return ("mapping", keys, [_structure_of(batch[k]) for k in keys])
    if isinstance(batch, (list, tuple)):
        return ("sequence", type(batch), [_structure_of(b) for b in batch])
    # Only reported if an empty batch must be built: non-empty batches pass through untouched.
    return ("unsupported", type(batch))


def _empty_tensor(shape, dtype, device, *, batch_first: bool, rand_on_empty: bool):
    shape = list(shape)
    if shape:
        # Batch dimension: 0 if batch_first, else 1 (a 1-D tensor only has dimension 0).
        dim = 0 if batch_first or len(shape) == 1 else 1
        shape[dim] = 1 if rand_on_empty else 0
    if rand_on_empty:
        # One data-independent input of random 0/1 values: carries nothing about the dataset.
        return torch.randint(0, 2, shape, device=device).to(dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


def _empty_like_structure(structure, *, batch_first: bool, rand_on_empty: bool):
    kind = structure[0]
    if kind == "tensor":
        _, shape, dtype, device = structure
        return _empty_tensor(
            shape, dtype, device, batch_first=batch_first, rand_on_empty=rand_on_empty
        )
    if kind == "mapping":
        _, keys, children = structure
        return {
            k: _empty_like_structure(c, batch_first=batch_first, rand_on_empty=rand_on_empty)
            for k, c in zip(keys, children)
        }
    if kind == "sequence":
        _, container, children = structure
        items = [
            _empty_like_structure(c, batch_first=batch_first, rand_on_empty=rand_on_empty)
            for c in children
        ]
        if container is list:
            return items
        if hasattr(container, "_fields"):  # namedtuple
            return container(*items)
        return container(items)
    raise TypeError(
        f"CollateFnWithEmpty: Unsupported batch type {structure[1].__name__} in the collated "
        "batches: an empty batch can only be built from tensors, mappings, lists and tuples. "
        "Return tensors from collate_fn (or keep such fields out of the batch)."
    )


class CollateFnWithEmpty:
    """Collate function that also handles the empty batches of Poisson sampling.

    A non-empty batch goes to ``collator_fn`` (returned as the list of samples if it is None);
    the structure of the first such output is remembered: containers (mappings as ``dict``, lists,
    tuples, nested), and for each tensor its shape, dtype and device. Values are never kept.

    An empty batch then becomes that structure with fresh tensors whose batch dimension (0 if
    ``batch_first``, else 1) is 0. With ``rand_on_empty=True`` that dimension is 1 and the tensor
    holds random 0/1 values instead, for models that cannot run on an empty batch. Structures with
    anything else than tensors, mappings, lists and tuples give a ``TypeError``.

    An empty batch before any non-empty one logs a warning ("First batch is empty") and returns a
    list with one ``torch.zeros(shape, dtype)`` per entry of ``sample_empty_shapes``/``dtypes``,
    which are full batch shapes including the 0 (e.g. ``[(0, 3), (0,)]``), or ``[]`` if they
    were not given.

    Args:
        collator_fn: the collate function for non-empty batches (None: the list of samples).
        batch_first: True if the batch is dimension 0 of the collated tensors, False for dimension
            1.
        rand_on_empty: an empty batch becomes one data-independent random example (batch size 1)
            instead of tensors with batch size 0.
        sample_empty_shapes: the shape of each field of one sample, to build empty batches before
            any non-empty batch was seen.
        dtypes: the dtype of each field of one sample (with ``sample_empty_shapes``).
    """

    def __init__(
        self,
        collator_fn: Optional[Callable[[List[Any]], Any]],
        batch_first: bool = True,
        rand_on_empty: bool = False,
        sample_empty_shapes: Optional[Sequence[Tuple]] = None,
        dtypes: Optional[Sequence[Union[torch.dtype, Type]]] = None,
    ) -> None:
        self.collator_fn = collator_fn
        self.batch_first = batch_first
        self.rand_on_empty = rand_on_empty
        self.sample_empty_shapes = sample_empty_shapes
        self.dtypes = dtypes
        self._structure = None
        # Layout of the first-batch-empty fallback: a list (as Opacus 1.6), or, set by
        # DPDataLoader for datasets of dicts or of single tensors, a dict or a bare tensor.
        self._fallback_keys: Optional[List[Any]] = None
        self._fallback_single = False

    def __call__(self, batch: List[Any]) -> Any:
        if len(batch) > 0:
            collated = self.collator_fn(batch) if self.collator_fn is not None else batch
            if self._structure is None:
                self._structure = _structure_of(collated)
            return collated
        if self._structure is not None:
            return _empty_like_structure(
                self._structure, batch_first=self.batch_first, rand_on_empty=self.rand_on_empty
            )
        return self._first_batch_empty()

    def _first_batch_empty(self) -> Any:
        logger.warning(
            "First batch is empty: Poisson sampling drew no sample before any non-empty batch "
            "showed the batch structure; returning %s.",
            (
                "empty tensors of sample_empty_shapes/dtypes"
                if self.sample_empty_shapes is not None and self.dtypes is not None
                else "[]"
            ),
        )
        if self.sample_empty_shapes is None or self.dtypes is None:
            return []
        fields = [
            torch.zeros(tuple(shape), dtype=_as_torch_dtype(dtype))
            for shape, dtype in zip(self.sample_empty_shapes, self.dtypes)
        ]
        if self._fallback_keys is not None:
            return dict(zip(self._fallback_keys, fields))
        if self._fallback_single:
            return fields[0]
        return fields


def wrap_collate_with_empty(
    *,
    collate_fn: Optional[Callable[[List[Any]], Any]],
    batch_first: bool = True,
    rand_on_empty: bool = False,
    sample_empty_shapes: Optional[Sequence[Tuple]] = None,
    dtypes: Optional[Sequence[Union[torch.dtype, Type]]] = None,
) -> CollateFnWithEmpty:
    """Wrap ``collate_fn`` in a :class:`CollateFnWithEmpty` with these arguments.

    Args:
        collate_fn: the collate function for non-empty batches (None: PyTorch's default).
        batch_first: True if the batch is dimension 0 of the collated tensors, False for dimension
            1.
        rand_on_empty: an empty batch becomes one data-independent random example (batch size 1)
            instead of tensors with batch size 0.
        sample_empty_shapes: the shape of each field of one sample, to build empty batches before
            any non-empty batch was seen.
        dtypes: the dtype of each field of one sample (with ``sample_empty_shapes``).

    Returns:
        the wrapped collate function.
    """
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
    # Sample 0 gives the fields, shapes and dtypes of the first-batch-empty fallback.
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
        collate_fn=collate_fn if collate_fn is not None else default_collate,
        batch_first=batch_first,
        rand_on_empty=rand_on_empty,
        sample_empty_shapes=[(0, *shape_safe(f)) for f in fields],
        dtypes=[dtype_safe(f) for f in fields],
    )
    wrapped._fallback_keys = keys
    wrapped._fallback_single = single
    return wrapped


def _poisson_sample_rate(data_loader: DataLoader) -> Optional[float]:
    """The rate at which ``data_loader`` Poisson-samples its dataset, or None if it does not.

    This is the rate the privacy accountant must record (``1 / len(data_loader)`` differs from it
    whenever ``1 / sample_rate`` is not a whole number). Also found on loaders returned by
    :func:`switch_generator`.
    """
    batch_sampler = getattr(data_loader, "batch_sampler", None)
    if isinstance(batch_sampler, _POISSON_SAMPLERS):
        return batch_sampler.sample_rate
    return None


def _rate_for_batches(num_batches: int) -> float:
    """The largest float ``q <= 1 / num_batches`` with ``int(1 / q) == num_batches``.

    ``1 / (1 / L)`` is below ``L`` in floating point for some L (93, 99, ...), which truncation
    would turn into one batch less per epoch; lowering q by an ulp or two keeps the epoch length.
    """
    q = 1.0 / num_batches
    while int(1 / q) < num_batches:
        q = math.nextafter(q, 0.0)
    return q


def _check_poisson_loader_args(owner, dataset, kwargs, *, forbidden, rate_hint) -> None:
    """Refuse what a Poisson loader cannot honour: an iterable dataset, or batch options that
    would override the sampling the accountant assumes."""
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"{owner} needs a map-style dataset (with __len__ and __getitem__): Poisson sampling "
            "draws indices. IterableDataset is not supported."
        )
    for name in forbidden:
        if name in kwargs:
            raise ValueError(
                f"{owner} chooses batches by Poisson sampling; do not pass {name}= (set "
                f"{rate_hint} instead)."
            )


def _user_collate_fn(data_loader: DataLoader):
    """The loader's collate function without the empty-batch wrapper a DP loader added."""
    collate_fn = data_loader.collate_fn
    if isinstance(collate_fn, CollateFnWithEmpty):
        return collate_fn.collator_fn
    return collate_fn


class _PoissonBatchLoader(DataLoader):
    """What the Poisson loaders share: a ``DataLoader`` over ``batch_sampler`` whose collate
    function handles empty batches, and the sampler's rate as ``sample_rate``."""

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler,
        *,
        collate_fn,
        distributed: bool,
        batch_first: bool,
        rand_on_empty: bool,
        **kwargs,
    ):
        self.distributed = distributed
        super().__init__(
            dataset=dataset,
            batch_sampler=batch_sampler,
            collate_fn=_collate_for_dataset(
                dataset, collate_fn, batch_first=batch_first, rand_on_empty=rand_on_empty
            ),
            **kwargs,
        )

    @property
    def sample_rate(self) -> float:
        """The Poisson sampling rate in use (the batch sampler's): what the accountant records
        (for cyclic Poisson sampling, the per-step rate within the current group)."""
        return self.batch_sampler.sample_rate


class DPDataLoader(_PoissonBatchLoader):
    """``DataLoader`` drawing Poisson batches: each sample is in each batch w.p. ``sample_rate``.

    The expected batch size is ``sample_rate * len(dataset)``; one epoch is
    ``int(1 / sample_rate)`` batches. With ``distributed=True`` each rank Poisson-samples its own
    shard of the dataset (``DistributedUniformWithReplacementSampler``).

    ``sample_rate`` (on the loader and on its ``batch_sampler``) is the rate actually used, which
    the privacy accountant records. ``drop_last`` is ignored (a warning is logged): dropping a
    batch would change the sampling. Empty batches are handled by :class:`CollateFnWithEmpty`
    around ``collate_fn`` (``default_collate`` if None); the fallback for an empty first batch is
    one ``(0, *field shape)`` tensor per field of ``dataset[0]``.

    ``generator`` drives the sampler only: batches are exactly the sampler's draws from it.

    Args:
        dataset: a map-style dataset (with ``__len__`` and ``__getitem__``).
        sample_rate: the probability with which each example joins each batch.
        collate_fn: the collate function (PyTorch's default if None), wrapped to handle empty
            batches.
        drop_last: ignored, with a warning: dropping a Poisson batch would change the privacy
            analysis.
        generator: the ``torch.Generator`` of the Poisson sampler.
        distributed: each process samples its own shard of the dataset.
        batch_first: True if the batch is dimension 0 of the collated tensors, False for dimension
            1.
        rand_on_empty: an empty batch becomes one data-independent random example (batch size 1)
            instead of tensors with batch size 0.

    Raises:
        ValueError: the dataset is an ``IterableDataset``, or ``batch_size``, ``shuffle``,
            ``sampler`` or ``batch_sampler`` is passed.
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
        _check_poisson_loader_args(
            "DPDataLoader",
            dataset,
            kwargs,
            forbidden=("batch_size", "batch_sampler", "sampler", "shuffle"),
            rate_hint="sample_rate = expected_batch_size / len(dataset)",
        )
        if distributed:
            batch_sampler = DistributedUniformWithReplacementSampler(
                total_size=len(dataset), sample_rate=sample_rate, generator=generator
            )
        else:
            batch_sampler = UniformWithReplacementSampler(
                num_samples=len(dataset), sample_rate=sample_rate, generator=generator
            )
        if drop_last:
            logger.warning(
                "DPDataLoader ignores drop_last=True: dropping a Poisson batch would change the "
                "sampling the privacy accounting assumes."
            )
        # `generator` is not handed to DataLoader: it would draw its worker base seed from the
        # same stream, so batches would no longer be exactly the sampler's draws from it.
        super().__init__(
            dataset,
            batch_sampler,
            collate_fn=collate_fn,
            distributed=distributed,
            batch_first=batch_first,
            rand_on_empty=rand_on_empty,
            **kwargs,
        )

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

        The expected batch size thus equals the original batch size and an epoch keeps
        ``len(data_loader)`` batches. A loader that already Poisson-samples keeps its rate.
        Dataset, collate_fn and the worker settings (num_workers, pin_memory, timeout,
        worker_init_fn, ...) are kept; ``generator`` defaults to the loader's sampling generator.

        Args:
            data_loader: the loader to convert; its dataset, collate function and worker settings
                are kept, and the sample rate is ``1 / len(data_loader)``.
            distributed: each process samples its own shard of the dataset.
            generator: the ``torch.Generator`` of the Poisson sampler.
            batch_first: True if the batch is dimension 0 of the collated tensors, False for
                dimension 1.
            rand_on_empty: an empty batch becomes one data-independent random example (batch size 1)
                instead of tensors with batch size 0.

        Returns:
            the new ``DPDataLoader``.

        Raises:
            ValueError: the loader wraps an ``IterableDataset``, yields no batches, or uses a custom
                batch sampler.
        """
        if isinstance(data_loader.dataset, IterableDataset):
            raise ValueError(
                "DPDataLoader.from_data_loader: Poisson sampling needs a map-style dataset; the "
                "data loader wraps an IterableDataset. Use a Dataset with __len__/__getitem__."
            )
        batch_sampler = data_loader.batch_sampler
        if isinstance(batch_sampler, _POISSON_SAMPLERS):
            sample_rate = batch_sampler.sample_rate
        elif batch_sampler is None or type(batch_sampler) is BatchSampler:
            if len(data_loader) == 0:
                raise ValueError(
                    "DPDataLoader.from_data_loader: the data loader yields no batches, so no "
                    "sample rate can be derived from it."
                )
            sample_rate = _rate_for_batches(len(data_loader))
        else:
            raise ValueError(
                "DPDataLoader.from_data_loader: the data loader uses a custom batch_sampler "
                f"({type(batch_sampler).__name__}): its batches cannot be turned into Poisson "
                "batches. Build the DPDataLoader directly with DPDataLoader(dataset, "
                "sample_rate=...)."
            )
        kwargs = _worker_settings(data_loader)
        collate_fn = _user_collate_fn(data_loader)
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
    if isinstance(data_loader.batch_sampler, _POISSON_SAMPLERS):
        return data_loader.batch_sampler.generator
    return data_loader.generator


def switch_generator(*, data_loader: DataLoader, generator):
    """A new ``DataLoader`` over the same batches, drawing its randomness from ``generator``.

    The batch sampler is retargeted: a Poisson sampler's own ``generator`` is replaced, a
    ``BatchSampler``'s inner sampler's (e.g. ``RandomSampler``). The new loader has the same
    dataset, batch sampler, collate_fn and worker settings, and ``generator=generator`` too:
    PyTorch draws each iteration's base seed from the loader's generator before the sampler
    draws, so both must share the stream. Used by secure mode to swap in its generator.

    Args:
        data_loader: the loader to copy.
        generator: the ``torch.Generator`` to draw from.

    Returns:
        the new ``DataLoader``.

    Raises:
        ValueError: the loader's sampler draws no random numbers or is not supported.
    """
    batch_sampler = data_loader.batch_sampler
    if isinstance(batch_sampler, _POISSON_SAMPLERS):
        batch_sampler.generator = generator
    elif isinstance(batch_sampler, BatchSampler):
        if not hasattr(batch_sampler.sampler, "generator"):
            raise ValueError(
                "switch_generator: the data loader's sampler "
                f"({type(batch_sampler.sampler).__name__}) draws no random numbers (it has no "
                "generator attribute), so there is no generator to switch."
            )
        batch_sampler.sampler.generator = generator
    else:
        raise ValueError(
            "switch_generator: unsupported batch sampler "
            f"{type(batch_sampler).__name__}; only BatchSampler and the Poisson samplers are "
            "supported (batch_size=None, non-batch loading, is not)."
        )
    # drop_last stays with the BatchSampler: DataLoader refuses it next to a batch_sampler.
    return DataLoader(
        dataset=data_loader.dataset,
        batch_sampler=batch_sampler,
        collate_fn=data_loader.collate_fn,
        generator=generator,
        **_worker_settings(data_loader),
    )


class CyclicPoissonDataLoader(_PoissonBatchLoader):
    """``DataLoader`` with cyclic Poisson sampling (:class:`CyclicPoissonSampler`), the sampling
    that banded matrix-factorization noise (``make_private(noise_mechanism="banded_mf")``) needs.

    The dataset is split once (seeded by ``group_seed``) into ``bands`` disjoint groups; step
    ``t`` draws each sample of group ``t mod bands`` with probability ``sample_rate``. The
    expected batch size is ``sample_rate * len(dataset) / bands``. ``sample_rate`` (on the loader
    and its ``batch_sampler``) is the per-step rate within the group: the rate the privacy
    reduction (DP-SGD with ``ceil(T / bands)`` steps at rate ``sample_rate``) uses. Empty batches,
    ``collate_fn``, ``generator`` and the other keyword arguments are handled as by
    :class:`DPDataLoader`.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        bands: int,
        group_seed: int = 0,
        steps: Optional[int] = None,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        generator=None,
        distributed: bool = False,
        batch_first: bool = True,
        rand_on_empty: bool = False,
        **kwargs,
    ):
        _check_poisson_loader_args(
            "CyclicPoissonDataLoader",
            dataset,
            kwargs,
            forbidden=("batch_size", "batch_sampler", "sampler", "shuffle", "drop_last"),
            rate_hint="sample_rate = expected_batch_size * bands / len(dataset)",
        )
        batch_sampler = CyclicPoissonSampler(
            num_samples=len(dataset),
            sample_rate=sample_rate,
            bands=bands,
            group_seed=group_seed,
            generator=generator,
            steps=steps,
            distributed=distributed,
        )
        super().__init__(
            dataset,
            batch_sampler,
            collate_fn=collate_fn,
            distributed=distributed,
            batch_first=batch_first,
            rand_on_empty=rand_on_empty,
            **kwargs,
        )

    @property
    def bands(self) -> int:
        """The number of groups (the ``b`` of banded MF)."""
        return self.batch_sampler.bands

    @classmethod
    def from_data_loader(
        cls,
        data_loader: DataLoader,
        *,
        bands: int,
        group_seed: int = 0,
        distributed: bool = False,
        generator=None,
        batch_first: bool = True,
        rand_on_empty: bool = False,
    ):
        """A cyclic Poisson loader over the same dataset with the same expected batch size and
        epoch length: ``sample_rate = bands / len(data_loader)`` within each group (it must be
        at most 1: a batch cannot be larger than a group) and ``len(data_loader)`` steps per
        epoch. Collate function and worker settings are kept."""
        owner = "CyclicPoissonDataLoader.from_data_loader"
        if isinstance(data_loader.dataset, IterableDataset):
            raise ValueError(f"{owner}: cyclic Poisson sampling needs a map-style dataset.")
        batch_sampler = data_loader.batch_sampler
        if isinstance(batch_sampler, (CyclicPoissonSampler,) + _POISSON_SAMPLERS):
            raise ValueError(
                f"{owner}: the data loader already Poisson-samples "
                f"({type(batch_sampler).__name__}); build CyclicPoissonDataLoader(dataset, "
                "sample_rate=..., bands=...) directly."
            )
        if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
            raise ValueError(
                f"{owner}: the data loader uses a custom batch_sampler "
                f"({type(batch_sampler).__name__}); build CyclicPoissonDataLoader(dataset, "
                "sample_rate=..., bands=...) directly."
            )
        num_batches = len(data_loader)
        if num_batches == 0:
            raise ValueError(f"{owner}: the data loader yields no batches.")
        sample_rate = bands * _rate_for_batches(num_batches)
        if sample_rate > 1.0:
            raise ValueError(
                f"{owner}: bands={bands} groups of about {len(data_loader.dataset) // bands} "
                f"samples are smaller than the expected batch size; use at most {num_batches} "
                "bands or a smaller batch size."
            )
        collate_fn = _user_collate_fn(data_loader)
        return cls(
            dataset=data_loader.dataset,
            sample_rate=sample_rate,
            bands=bands,
            group_seed=group_seed,
            steps=num_batches,
            collate_fn=collate_fn,
            generator=generator if generator is not None else _sampler_generator(data_loader),
            distributed=distributed,
            batch_first=batch_first,
            rand_on_empty=rand_on_empty,
            **_worker_settings(data_loader),
        )

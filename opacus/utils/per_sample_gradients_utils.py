"""Check a model's per-sample gradients against a slow micro-batch reference.

``check_per_sample_gradients_are_correct`` is the helper users call on their own model before
training with it: it runs the model once per sample (micro-batches of one) and compares the
gradients with what the grad-sample machinery computes in one batched pass.
"""

from typing import Callable, Dict, Iterable, List, Union

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence

from opacus.grad_sample.module_utils import clone_module, trainable_parameters
from opacus.grad_sample.utils import get_gsm_class, wrap_model
from opacus.layers.packed_sequences import (
    compute_seq_lengths,
    packed_sequence_to_list,
    unpack_packedsequences,
)

__all__ = [
    "ModelWithLoss",
    "check_per_sample_gradients_are_correct",
    "check_torch_version_for_ew_sample",
    "clone_module",
    "compute_grad_samples_microbatch_and_opacus",
    "compute_microbatch_grad_sample",
    "compute_microbatch_grad_sample_tensor_or_seq",
    "compute_opacus_grad_sample",
    "compute_seq_lengths",
    "get_grad_sample_modes",
    "is_batch_empty",
    "trainable_parameters",
    "unpack_packedsequences",
    "wrap_model",
]


def check_torch_version_for_ew_sample() -> bool:
    """True if ``torch.nn.utils._expanded_weights`` (expanded-weights mode) is available.

    Returns:
        whether this torch has expanded weights (``grad_sample_mode="ew"``).
    """
    try:
        from torch.nn.utils import _expanded_weights  # noqa: F401
    except ImportError:
        return False
    return True


def get_grad_sample_modes(use_ew: bool = False) -> List[str]:
    """Grad-sample modes worth checking: hooks and functorch, plus expanded weights on request.

    Args:
        use_ew: include ``"ew"`` (expanded weights).
    """
    modes = ["hooks", "functorch"]
    if use_ew and check_torch_version_for_ew_sample():
        modes.append("ew")
    return modes


def is_batch_empty(batch: Union[torch.Tensor, Iterable[torch.Tensor]]) -> bool:
    """True for a zero-size batch (a tensor, or a sequence whose first tensor is empty).

    Args:
        batch: a tensor or a sequence of tensors.
    """
    if torch.is_tensor(batch):
        return batch.numel() == 0
    first = next(iter(batch), None)
    return first is None or (torch.is_tensor(first) and first.numel() == 0)


class ModelWithLoss(nn.Module):
    """Wraps ``module`` so that its forward returns an L1 loss of the output against zeros.

    With ``loss_reduction="mean"`` the loss averages over the batch (and every other dimension),
    with ``"sum"`` it sums: exactly the two reductions that the grad-sample modules are told about.

    Args:
        module: the model.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the samples of the batch.

    Raises:
        ValueError: ``loss_reduction`` is neither ``"mean"`` nor ``"sum"``.
    """

    def __init__(self, module: nn.Module, loss_reduction: str = "mean"):
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"ModelWithLoss: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}"
            )
        self.wrapped_module = module
        self.criterion = nn.L1Loss(reduction=loss_reduction)

    def forward(self, x):
        """Scalar L1 loss of ``wrapped_module(x)`` against zeros (mean or sum per the reduction).

        Args:
            x: The wrapped module's input (a tensor or ``PackedSequence``), or a ``tuple`` of
                its positional inputs (e.g. ``(input, offsets)`` for ``nn.EmbeddingBag``).

        Returns:
            A 0-d tensor. Tuple outputs (recurrent layers) use their first element; a
            ``PackedSequence`` output uses its ``.data``.
        """
        if isinstance(x, tuple) and not isinstance(x, PackedSequence):
            out = self.wrapped_module(*x)
        else:
            out = self.wrapped_module(x)
        if isinstance(out, tuple):  # recurrent layers return (output, state)
            out = out[0]
        if isinstance(out, PackedSequence):
            out = out.data
        return self.criterion(out, torch.zeros_like(out))


def _batch_first_view(x, batch_first: bool):
    """What ``chunk_method`` receives: the whole batch, batch first (a PackedSequence as the list
    of its sequences, in the original batch order; lists and tuples as they are)."""
    if isinstance(x, PackedSequence):
        return packed_sequence_to_list(x)
    if torch.is_tensor(x) and not batch_first:
        return x.transpose(0, 1)
    return x


def _one_sample_batch(sample, batch_first: bool, packed: bool):
    if packed:
        from torch.nn.utils.rnn import pack_sequence

        return pack_sequence([sample])
    if isinstance(sample, tuple):
        return sample  # positional inputs of one sample, batch dimension included
    return sample.unsqueeze(0 if batch_first else 1)


class _DeterministicSeeded:
    """Deterministic algorithms on and torch/numpy seeded 0 inside; the flags restored after."""

    def __enter__(self):
        self._enabled = torch.are_deterministic_algorithms_enabled()
        self._warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(0)
        np.random.seed(0)
        return self

    def __exit__(self, *args):
        torch.use_deterministic_algorithms(self._enabled, warn_only=self._warn_only)


def compute_microbatch_grad_sample(
    x: Union[torch.Tensor, List[torch.Tensor]],
    module: nn.Module,
    batch_first: bool = True,
    loss_reduction: str = "mean",
    chunk_method: Callable = iter,
) -> Dict[str, torch.Tensor]:
    """Per-sample gradients ``{name: (batch, *shape)}`` from one forward/backward per sample.

    ``chunk_method`` receives the whole batch (a tensor transposed to batch first if needed; a
    ``PackedSequence`` as the list of its sequences; lists and tuples unchanged) and yields one
    sample at a time.  A ``tuple`` sample is passed to the model as its positional inputs, as
    is (e.g. ``(input, offsets)`` of one ``nn.EmbeddingBag`` bag); any other sample gets a batch
    dimension of 1 (dim 0, or dim 1 when ``batch_first=False``).  Each sample's gradient is that
    of its own loss, which is what the batched machinery computes for either reduction.  For a
    ``PackedSequence`` with ``"mean"`` the batch loss averages over all ``sum_j T_j`` time steps,
    so sample ``i``'s share (times the batch size ``B``, as the grad-sample hooks scale it) is
    its own mean loss times ``B T_i / sum_j T_j``.  Runs with deterministic algorithms and torch
    and numpy seeded 0; the deterministic flag is restored afterwards.

    Args:
        x: the input batch (a tensor, or a ``PackedSequence``).
        module: the model to check (it is copied, not modified).
        batch_first: True if the batch is dimension 0 of ``x``, False for dimension 1.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the samples of the batch.
        chunk_method: yields the samples of the batch one at a time.

    Returns:
        ``{parameter name: (batch, *shape)}``.
    """
    packed = isinstance(x, PackedSequence)
    with _DeterministicSeeded():
        model = ModelWithLoss(clone_module(module), loss_reduction)
        params = [p for _, p in trainable_parameters(model)]
        names = [n.replace("wrapped_module.", "", 1) for n, _ in trainable_parameters(model)]
        per_sample = {n: [] for n in names}
        for sample in chunk_method(_batch_first_view(x, batch_first)):
            loss = model(_one_sample_batch(sample, batch_first, packed))
            if packed and loss_reduction == "mean":
                loss = loss * (int(x.batch_sizes[0]) * sample.shape[0] / x.data.shape[0])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for n, p, g in zip(names, params, grads):
                per_sample[n].append(torch.zeros_like(p) if g is None else g.detach())
    return {n: torch.stack(gs) for n, gs in per_sample.items()}


def compute_microbatch_grad_sample_tensor_or_seq(
    x: Union[torch.Tensor, PackedSequence],
    module: nn.Module,
    batch_first: bool = True,
    loss_reduction: str = "mean",
):
    """:func:`compute_microbatch_grad_sample` for a tensor or a ``PackedSequence``.

    Args:
        x: the input batch (a tensor, or a ``PackedSequence``).
        module: the model to check (it is copied, not modified).
        batch_first: True if the batch is dimension 0 of ``x``, False for dimension 1.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the samples of the batch.
    """
    return compute_microbatch_grad_sample(
        x, module, batch_first=batch_first, loss_reduction=loss_reduction
    )


def compute_opacus_grad_sample(
    x: Union[torch.Tensor, PackedSequence],
    module: nn.Module,
    batch_first: bool = True,
    loss_reduction: str = "mean",
    grad_sample_mode: str = "hooks",
) -> Dict[str, torch.Tensor]:
    """Per-sample gradients from one batched pass through a grad-sample module of the given mode.

    Args:
        x: the input batch (a tensor, or a ``PackedSequence``).
        module: the model to check (it is copied, not modified).
        batch_first: True if the batch is dimension 0 of ``x``, False for dimension 1.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the samples of the batch.
        grad_sample_mode: the grad-sample mode to check (``"hooks"``, ``"functorch"`` or ``"ew"``).

    Returns:
        ``{parameter name: (batch, *shape)}``.
    """
    gsm_class = get_gsm_class(grad_sample_mode)
    model = ModelWithLoss(clone_module(module), loss_reduction)
    kwargs = dict(batch_first=batch_first, loss_reduction=loss_reduction)
    if grad_sample_mode == "functorch":
        kwargs["force_functorch"] = True
    gsm = gsm_class(model, **kwargs)
    loss = gsm(x)
    loss.backward()
    out = {}
    for name, p in trainable_parameters(gsm):
        key = name.split("wrapped_module.", 1)[1] if "wrapped_module." in name else name
        out[key] = p.grad_sample.detach().clone()
    if hasattr(gsm, "remove_hooks"):
        gsm.remove_hooks()
    return out


def compute_grad_samples_microbatch_and_opacus(
    x: Union[torch.Tensor, PackedSequence],
    module: nn.Module,
    batch_first: bool = True,
    loss_reduction: str = "mean",
    grad_sample_mode: str = "hooks",
    chunk_method: Callable = iter,
):
    """Both dictionaries: ``(microbatch_grad_samples, opacus_grad_samples)``.

    Raises:
        RuntimeError: ``x`` is an empty batch, or ``grad_sample_mode="ew"`` with
            ``batch_first=False`` (expanded weights need the batch on dim 0).
        ValueError: the two computations report different parameter names.

    Args:
        x: the input batch (a tensor, or a ``PackedSequence``).
        module: the model to check (it is copied, not modified).
        batch_first: True if the batch is dimension 0 of ``x``, False for dimension 1.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the samples of the batch.
        grad_sample_mode: the grad-sample mode to check (``"hooks"``, ``"functorch"`` or ``"ew"``).
        chunk_method: splits the batch into samples (see ``compute_microbatch_grad_sample``).
    """
    _check_inputs(x, batch_first, grad_sample_mode, "compute_grad_samples_microbatch_and_opacus")
    microbatch = compute_microbatch_grad_sample(
        x, module, batch_first=batch_first, loss_reduction=loss_reduction, chunk_method=chunk_method
    )
    opacus_gs = compute_opacus_grad_sample(
        x,
        module,
        batch_first=batch_first,
        loss_reduction=loss_reduction,
        grad_sample_mode=grad_sample_mode,
    )
    if microbatch.keys() != opacus_gs.keys():
        raise ValueError(
            "compute_grad_samples_microbatch_and_opacus: parameter names differ between the "
            f"reference ({sorted(microbatch)}) and the grad-sample module ({sorted(opacus_gs)})"
        )
    return microbatch, opacus_gs


def _check_inputs(x, batch_first: bool, grad_sample_mode: str, who: str) -> None:
    if not isinstance(x, PackedSequence) and is_batch_empty(x):
        raise RuntimeError(f"{who}: x is an empty batch; pass at least one sample")
    if grad_sample_mode == "ew" and not batch_first:
        raise RuntimeError(
            f"{who}: grad_sample_mode='ew' (expanded weights) needs the batch on dim 0; pass "
            "batch_first=True with batch-first data, or use 'hooks' or 'functorch'"
        )


def check_per_sample_gradients_are_correct(
    x: Union[torch.Tensor, PackedSequence],
    module: nn.Module,
    *,
    batch_first: bool = True,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    grad_sample_mode: str = "hooks",
) -> bool:
    """True if the batched per-sample gradients of ``module`` on ``x`` match the micro-batch loop,
    for both loss reductions. Run it on a few samples of your data before training a new model.

    Raises:
        RuntimeError: ``x`` is an empty batch (not a PackedSequence and ``is_batch_empty(x)``),
            or ``grad_sample_mode="ew"`` with ``batch_first=False``.
        ValueError: the two computations report different parameter names.

    Args:
        x: the input batch (a tensor, or a ``PackedSequence``).
        module: the model to check (it is copied, not modified).
        batch_first: True if the batch is dimension 0 of ``x``, False for dimension 1.
        atol: absolute tolerance of the comparison.
        rtol: relative tolerance of the comparison.
        grad_sample_mode: the grad-sample mode to check (``"hooks"``, ``"functorch"`` or ``"ew"``).

    Returns:
        True if every per-sample gradient matches.
    """
    if grad_sample_mode == "functorch":
        # `import torch.func` here would make `torch` a local name of this function.
        from torch import func as _torch_func  # noqa: F401  (clear ImportError on old torch)
    _check_inputs(x, batch_first, grad_sample_mode, "check_per_sample_gradients_are_correct")
    for reduction in ("sum", "mean"):
        micro, ours = compute_grad_samples_microbatch_and_opacus(
            x,
            module,
            batch_first=batch_first,
            loss_reduction=reduction,
            grad_sample_mode=grad_sample_mode,
        )
        for name, expected in micro.items():
            got = ours[name]
            if got.shape != expected.shape:
                return False
            if not torch.allclose(got, expected, atol=atol, rtol=rtol):
                return False
    return True

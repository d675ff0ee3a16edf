"""The loss side of fast gradient clipping: a criterion whose ``backward()`` clips.

Ghost clipping (Li et al. 2022, "Large language models can be strong differentially private
learners", building on Goodfellow 2015 and Lee & Kifer 2021) needs two backward passes:

1. backward of the batch loss with the module's hooks on: the hooks compute every sample's
   gradient norm without materialising per-sample gradients (``p._norm_sample``);
2. coefficients ``c_i = min(1, C / (||g_i|| + 1e-6))`` from those norms;
3. backward of ``sum_i c_i * L_i`` with the hooks off: by linearity ``p.grad = sum_i c_i g_i``,
   the clipped sum, which ``DPOptimizerFastGradientClipping`` then noises and scales.

The first pass uses ``torch.autograd.grad`` so that the unclipped gradient never lands in
``p.grad``.  Where the module can book-keep (Bu et al. 2023; ``plan_book_keeping``), step 3 is
replaced by forming ``sum_i c_i g_i`` from the activations and backprops the first pass kept.
``L_i`` is sample ``i``'s own loss (the criterion with ``reduction="none"``), so the per-sample
gradient is the gradient of that sample's loss, as for ``GradSampleModule``.
"""

import copy
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping

__all__ = [
    "DPLossFastGradientClipping",
    "DPOptimizerFastGradientClipping",
    "DPTensorFastGradientClipping",
    "GradSampleHooksFastGradientClipping",
    "GradSampleModuleFastGradientClipping",
    "double_backward",
]


def _batch_loss(loss_per_sample: torch.Tensor, loss_reduction: str) -> torch.Tensor:
    return loss_per_sample.mean() if loss_reduction == "mean" else loss_per_sample.sum()


def per_sample_loss(loss: torch.Tensor, loss_reduction: str, shape=None) -> torch.Tensor:
    """Reduce an unreduced criterion output to one loss per sample, shape ``(batch,)``.

    ``shape=(batch, ...)``: the loss was computed on inputs flattened from that shape (e.g. a
    language model's ``(B * T, V)`` logits), so it is first reshaped to ``(batch, -1)``.  Losses
    with extra dims (per-token losses ``(B, T)``) are reduced over them with ``loss_reduction``,
    which keeps ``mean``/``sum`` of the per-sample losses equal to the criterion's batch loss.
    """
    if loss.dim() == 0:
        raise ValueError(
            "the criterion returned a scalar; DPLossFastGradientClipping needs one loss per "
            "sample: use a criterion with a `reduction` attribute (set to 'none' here) or a "
            "function returning an unreduced loss with the batch on dim 0"
        )
    if shape is not None:
        batch = shape[0]
        if loss.numel() % batch != 0:
            raise ValueError(
                f"cannot split a loss of {loss.numel()} elements into shape[0]={batch} samples"
            )
        loss = loss.reshape(batch, -1)
    if loss.dim() > 1:
        dims = tuple(range(1, loss.dim()))
        loss = loss.mean(dim=dims) if loss_reduction == "mean" else loss.sum(dim=dims)
    return loss


def _ghost_module(module: nn.Module) -> nn.Module:
    # A data-parallel wrapper (DPDDP, DDP) holds the GradSampleModuleFastGradientClipping in
    # ``.module`` and does not forward attribute access to it.
    inner = module
    while not hasattr(inner, "get_clipping_coef") and isinstance(
        getattr(inner, "module", None), nn.Module
    ):
        inner = inner.module
    if not hasattr(inner, "get_clipping_coef"):
        raise TypeError(
            f"{type(module).__name__} is not a GradSampleModuleFastGradientClipping (no "
            "get_clipping_coef): wrap the model with grad_sample_mode='ghost' before using "
            "DPLossFastGradientClipping"
        )
    return inner


_GhostModule = Union[GradSampleModuleFastGradientClipping, GradSampleHooksFastGradientClipping]


def double_backward(
    module: _GhostModule,
    optimizer: DPOptimizerFastGradientClipping,
    loss_per_sample: torch.Tensor,
) -> None:
    """The two backward passes of ghost clipping (module docstring); leaves the clipped sum in
    ``p.grad`` of every trainable parameter of ``module``.

    The clip bound is the optimizer's ``max_grad_norm`` (the attribute schedulers change); it is
    copied into ``module.max_grad_norm`` before the coefficients are computed.
    """
    wrapper, module = module, _ghost_module(module)
    loss_reduction = getattr(module, "loss_reduction", "mean")
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("double_backward: the module has no trainable parameters")
    if hasattr(module, "enable_hooks"):
        module.enable_hooks()
    # Book-keeping replaces the second pass, except under torch DDP, whose gradient all-reduce
    # is driven by the backward pass itself.
    book_keeping = (
        loss_per_sample.numel() > 0
        and not _under_torch_ddp(wrapper, module)
        and getattr(module, "plan_book_keeping", lambda: False)()
    )
    coupled = [] if book_keeping else getattr(module, "batch_coupled_layers", lambda: [])()
    if coupled:
        raise NotImplementedError(
            "ghost clipping: the second backward pass cannot clip "
            + ", ".join(f"'{name}'" for name in coupled)
            + " (scale_grad_by_freq counts lookups over the whole batch, so samples are "
            "coupled) and this model cannot book-keep (every trainable layer must be an "
            "nn.Linear or nn.Embedding called once per forward): use grad_sample_mode='hooks' "
            "or scale_grad_by_freq=False"
        )
    # First pass: only the hooks' norms are wanted.  Asking for the gradients just below the
    # hooked layers' backward-hook nodes runs every hook but prunes the weight-gradient
    # branches; otherwise the parameter gradients are returned (not stored) and dropped.
    anchors = getattr(module, "first_pass_anchors", lambda: None)()
    targets = _lowest_anchors(anchors) if anchors else trainable
    torch.autograd.grad(
        _batch_loss(loss_per_sample, loss_reduction),
        targets,
        retain_graph=not book_keeping,
        allow_unused=True,
    )
    # The anchors keep their calls' graphs alive: release them so that calls whose output the
    # loss never used are recognised as such (they contribute nothing, see _check_every_...).
    del anchors, targets
    _check_every_hook_fired(module)
    module.max_grad_norm = optimizer.max_grad_norm
    coef = module.get_clipping_coef().detach()
    if coef.shape != loss_per_sample.shape:
        raise ValueError(
            f"clipping coefficients of shape {tuple(coef.shape)} do not match the per-sample "
            f"loss of shape {tuple(loss_per_sample.shape)}: the module's batch dimension and "
            "the loss's dim 0 must agree (check batch_first)"
        )
    if book_keeping:
        if not module.accumulate_clipped_sum(coef):
            raise RuntimeError(
                "ghost clipping: the norm pass did not keep every layer's activations and "
                "backprops for book-keeping, and its graph is freed; run exactly one forward "
                "pass per DP loss backward"
            )
    else:
        module.disable_hooks()
        try:
            (coef.to(loss_per_sample.dtype) * loss_per_sample).sum().backward()
        finally:
            module.enable_hooks()
    _mark_clipped_backward(optimizer)


def _under_torch_ddp(wrapper: nn.Module, ghost: nn.Module) -> bool:
    """True if a torch ``DistributedDataParallel`` wraps the ghost module or is wrapped by it."""
    chain = [wrapper]
    while chain[-1] is not ghost and isinstance(getattr(chain[-1], "module", None), nn.Module):
        chain.append(chain[-1].module)
    chain.append(getattr(ghost, "_module", None))
    return any(isinstance(m, nn.parallel.DistributedDataParallel) for m in chain)


def _check_every_hook_fired(module) -> None:
    """Refuse to clip when a layer that ran in the forward pass got no norm in the first pass.

    Its norm would silently count as zero, so its samples would be clipped too little (a privacy
    breach). This happens on the parameter-gradient fallback path when a hooked layer's backward
    hook never runs, e.g. the first layer when the model input itself requires grad, or when a
    forward pass ran without its backward.
    """
    if hasattr(module, "_prune_orphaned_calls"):
        module._prune_orphaned_calls()  # calls whose output the loss never used contribute 0
    leftover = [m for m, calls in getattr(module, "_activations", {}).items() if calls]
    if not leftover:
        return
    names = {id(m): name.replace("_module.", "", 1) for name, m in module.named_modules()}
    listed = ", ".join(
        f"'{names.get(id(m), type(m).__name__)}' ({type(m).__name__})" for m in leftover
    )
    for m in leftover:
        module._activations[m].clear()
    raise RuntimeError(
        "ghost clipping: the norm pass computed no per-sample norm for " + listed + ", which ran "
        "in the forward pass; clipping without it would under-clip. Run exactly one forward pass "
        "per DP loss backward, and do not make the model input require grad."
    )


def _lowest_anchors(anchors: list) -> list:
    """Drop each anchor with another anchor below it in the graph (towards the leaves).

    A node runs in a backward pass iff a requested gradient lies below it, so the lowest anchors
    suffice to run every hook node, and only their (activation-sized) gradients are held.
    """
    anchor_nodes = {edge.node for edge in anchors}
    below = {}  # node -> whether some anchor node lies strictly below it
    for start in anchor_nodes:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in below:
                continue
            children = [fn for fn, _ in node.next_functions if fn is not None]
            if expanded:
                below[node] = any(c in anchor_nodes or below[c] for c in children)
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in below)
    return [edge for edge in anchors if not below[edge.node]]


def _mark_clipped_backward(optimizer) -> None:
    """Tell the optimizer that ``p.grad`` now holds a clipped sum (it refuses ``p.grad`` left by
    a plain, unclipped ``backward()`` otherwise)."""
    record = getattr(optimizer, "_record_clipped_backward", None)
    if record is not None:
        record()


class DPTensorFastGradientClipping(object):
    """A per-sample loss whose ``backward()`` runs ghost clipping's double backward.

    Behaves like the reduced loss for logging (``item()``, ``detach()``, ``str``).
    """

    def __init__(
        self,
        module: _GhostModule,
        optimizer: DPOptimizerFastGradientClipping,
        loss_per_sample: torch.Tensor,
        loss_reduction: str = "mean",
    ):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        module_reduction = getattr(_ghost_module(module), "loss_reduction", loss_reduction)
        if module_reduction != loss_reduction:
            raise ValueError(
                f"loss_reduction={loss_reduction!r} differs from the module's "
                f"loss_reduction={module_reduction!r}: wrap the module and the loss with the same"
            )
        if loss_per_sample.dim() != 1:
            raise ValueError(
                f"loss_per_sample must have shape (batch,), got {tuple(loss_per_sample.shape)}"
            )
        self.module = module
        self.optimizer = optimizer
        self.loss_per_sample = loss_per_sample
        self.loss_reduction = loss_reduction

    def item(self):
        """The reduced (``mean`` or ``sum``) loss as a Python number."""
        return self.detach().item()

    def detach(self):
        """The reduced loss, detached from the graph."""
        return _batch_loss(self.loss_per_sample.detach(), self.loss_reduction)

    def __str__(self):
        return f"DPTensorFastGradientClipping(loss={self.item()}, reduction={self.loss_reduction})"

    __repr__ = __str__

    def backward(self):
        """Double backward: afterwards ``p.grad`` holds the sum of clipped per-sample gradients."""
        double_backward(self.module, self.optimizer, self.loss_per_sample)


class DPLossFastGradientClipping(object):
    """Wraps a criterion so that ``criterion(output, target).backward()`` clips (ghost clipping).

    ``criterion`` is a loss module with a ``reduction`` attribute (a copy with
    ``reduction="none"`` is used; ``loss_reduction``, not the criterion's own reduction, decides
    how the batch loss is reduced) or a function returning unreduced losses.
    """

    def __init__(
        self,
        module: _GhostModule,
        optimizer: DPOptimizerFastGradientClipping,
        criterion,
        loss_reduction: str = "mean",
    ):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        criterion_reduction = getattr(criterion, "reduction", None)
        if criterion_reduction is not None:
            criterion = copy.copy(criterion)
            criterion.reduction = "none"
        self.module = module
        self.optimizer = optimizer
        self.criterion = criterion
        self.loss_reduction = loss_reduction

    def __call__(
        self, input, target, shape: Optional[Sequence[int]] = None
    ) -> DPTensorFastGradientClipping:
        """Per-sample losses of ``criterion(input, target)`` as a ``DPTensorFastGradientClipping``.

        ``shape``: the ``(batch, ...)`` shape that ``input`` was flattened from, if any.
        """
        loss = per_sample_loss(self.criterion(input, target), self.loss_reduction, shape)
        return DPTensorFastGradientClipping(self.module, self.optimizer, loss, self.loss_reduction)

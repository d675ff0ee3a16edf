"""The loss side of fast gradient clipping: a criterion whose ``backward()`` clips.

Ghost clipping (Li et al. 2022, "Large language models can be strong differentially private
learners", building on Goodfellow 2015 and Lee & Kifer 2021) needs two backward passes:

1. backward of the batch loss with the module's hooks on: the hooks compute every sample's
   gradient norm without materialising per-sample gradients (``p._norm_sample``);
2. coefficients ``c_i = min(1, C / (||g_i|| + 1e-6))`` from those norms;
3. backward of ``sum_i c_i * L_i`` with the hooks off: by linearity ``p.grad = sum_i c_i g_i``,
   the clipped sum, which ``DPOptimizerFastGradientClipping`` then noises and scales.

The first pass uses ``torch.autograd.grad`` so that the unclipped gradient never lands in
``p.grad``.  Reentrant activation checkpointing (``torch.utils.checkpoint(...,
use_reentrant=True)``) cannot run under ``torch.autograd.grad``: when the forward pass ran
hooked layers with gradients off (which is how that checkpointing runs its segments), the first
pass is a real backward whose (unclipped) parameter gradients are discarded, ``p.grad`` being
restored to what it held before.  Where the module can book-keep (Bu et al. 2023;
``plan_book_keeping``), step 3 is replaced by forming ``sum_i c_i g_i`` from the activations and
backprops the first pass kept.  ``L_i`` is sample ``i``'s own loss (the criterion with
``reduction="none"``), so the per-sample gradient is the gradient of that sample's loss, as for
``GradSampleModule``.  Adaptive clipping (``opacus.utils.adaptive_clipping``) runs the same
passes and only chooses the bound between them (``clip_bound`` of ``double_backward``).

The loss talks to the module and the optimizer through two narrow interfaces defined here:
``ClippedSumHooks`` (what the module's hooks offer: norms, coefficients, the norm pass's plan,
book-keeping; ``GradSampleHooksFastGradientClipping`` implements it) and
``ClippedSumOptimizer`` (what the optimizer offers: the bound, the record of clipped backward
passes; ``DPOptimizerFastGradientClipping`` implements it).  This module imports neither side.
(Its public 1.6 path ``opacus.utils.fast_gradient_clipping_utils`` re-exports it.)
"""

import copy
import logging
from typing import Callable, List, Optional, Protocol, Sequence

import torch
import torch.nn as nn

__all__ = [
    "ClippedSumHooks",
    "ClippedSumOptimizer",
    "DPLossFastGradientClipping",
    "DPTensorFastGradientClipping",
    "double_backward",
    "per_sample_loss",
]

logger = logging.getLogger(__name__)

_REDUCTIONS = ("mean", "sum")


def _check_reduction(loss_reduction, owner: str) -> None:
    if loss_reduction not in _REDUCTIONS:
        raise ValueError(
            f"{owner}: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}: it says "
            "how the per-sample losses make up the batch loss (and must match the module's)"
        )


def _batch_loss(loss_per_sample: torch.Tensor, loss_reduction: str) -> torch.Tensor:
    return loss_per_sample.mean() if loss_reduction == "mean" else loss_per_sample.sum()


def per_sample_loss(
    loss: torch.Tensor,
    loss_reduction: str,
    shape=None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reduce an unreduced criterion output to one loss per sample, shape ``(batch,)``.

    ``shape=(batch, ...)``: the loss was computed on inputs flattened from that shape (e.g. a
    language model's ``(B * T, V)`` logits), so it is first reshaped to ``(batch, -1)``.  Losses
    with extra dims (per-token losses ``(B, T)``) are reduced over them with ``loss_reduction``
    (``"mean"`` or ``"sum"``).  ``weights`` (same number of elements as ``loss``): each element's
    weight in that mean, e.g. 0 for a token whose label is a criterion's ``ignore_index``; the
    mean of sample ``i`` is then ``sum_t loss_it / sum_t weights_it`` (0 if all its weights are
    0), which is what ``nn.CrossEntropyLoss`` gives for that sample alone.
    """
    if loss.dim() == 0:
        raise ValueError(
            "the criterion returned a scalar; DPLossFastGradientClipping needs one loss per "
            "sample: use a criterion with a `reduction` attribute (set to 'none' here) or a "
            "function returning an unreduced loss with the batch on dim 0"
        )
    if weights is not None and weights.numel() != loss.numel():
        raise ValueError(
            f"per_sample_loss: weights has {weights.numel()} elements but the loss has "
            f"{loss.numel()}; pass one weight per loss element"
        )
    if shape is not None:
        batch = shape[0]
        if loss.numel() % batch != 0:
            raise ValueError(
                f"cannot split a loss of {loss.numel()} elements into shape[0]={batch} samples"
            )
        loss = loss.reshape(batch, -1)
    if loss.dim() <= 1:
        return loss
    flat = loss.reshape(loss.shape[0], -1)
    if loss_reduction == "sum":
        return flat.sum(dim=1)
    if weights is None:
        return flat.mean(dim=1)
    total = weights.reshape(flat.shape).to(flat.dtype).sum(dim=1)
    # A sample whose tokens are all ignored has loss 0 (not 0/0): it contributes nothing.
    return flat.sum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))


def _mean_weights(criterion, target) -> Optional[torch.Tensor]:
    """Weights of the elements in ``criterion``'s own ``"mean"`` (``per_sample_loss``), for the
    criteria whose mean is weighted: ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` with class-index
    targets divide by the summed class weights of the targets that are not ``ignore_index``."""
    if not isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return None
    if not torch.is_tensor(target) or target.is_floating_point() or target.is_complex():
        return None  # class probabilities: a plain mean over the elements
    valid = target != criterion.ignore_index
    if criterion.weight is None:
        return valid
    classes = torch.where(valid, target, torch.zeros_like(target))
    return criterion.weight[classes] * valid


class ClippedSumHooks:
    """The module side of ghost clipping, as the loss (``double_backward``) uses it.

    ``GradSampleHooksFastGradientClipping`` (and so every ghost wrapper) implements it; a
    data-parallel wrapper around one (``DPDDP``, torch DDP) is looked through via ``.module``.
    Required: the attributes ``loss_reduction`` and ``max_grad_norm`` (set by the loss before
    ``get_clipping_coef``), ``enable_hooks``, ``disable_hooks``, ``get_norm_sample`` and
    ``get_clipping_coef``.  The other methods have the defaults of hooks that neither
    book-keep nor plan their norm pass.
    """

    loss_reduction: str
    max_grad_norm: float
    # The per-sample loss's ``grad_fn`` while ``plan_book_keeping`` runs (None otherwise): the
    # graph whose saved tensors the norm pass frees as it goes (memory budget).
    norm_pass_root = None

    def enable_hooks(self) -> None:
        """Switch the hooks on (the norm pass)."""
        raise NotImplementedError

    def disable_hooks(self) -> None:
        """Switch the hooks off (the clipped second pass)."""
        raise NotImplementedError

    def get_norm_sample(self) -> torch.Tensor:
        """``(batch,)``: every sample's gradient norm, from the norm pass."""
        raise NotImplementedError

    def get_clipping_coef(self) -> torch.Tensor:
        """``(batch,)``: ``min(1, max_grad_norm / (norm + 1e-6))`` (``optimizers/clipping.py``)."""
        raise NotImplementedError

    def clipped_parameters(self) -> List[nn.Parameter]:
        """The trainable parameters whose clipped sum the loss leaves in ``p.grad``: those of
        ``hooked_model()`` that require grad (implementations may list them faster)."""
        return [p for p in self.hooked_model().parameters() if p.requires_grad]

    def hooked_model(self) -> nn.Module:
        """The ``nn.Module`` whose parameters the hooks cover: this wrapper, or the user's model
        for an unwrapped hooks object (``make_private(..., wrap_model=False)``)."""
        return self if isinstance(self, nn.Module) else self._module

    def wrapped_model(self) -> Optional[nn.Module]:
        """The user's model the hooks were put on (``None`` if unknown)."""
        return getattr(self, "_module", None)

    @property
    def grad_accumulation_allowed(self) -> bool:
        """False under Poisson sampling (``forbid_grad_accumulation``)."""
        return True

    def measures_every_parameter(self) -> bool:
        """True if every parameter the loss reaches must have a norm (``p._norm_sample``)."""
        return False

    def first_pass_anchors(self) -> Optional[list]:
        """Gradient edges whose gradients run every hook (or None: ask the parameters')."""
        return None

    def norm_pass_needs_backward(self) -> bool:
        """True if the norm pass must be a real ``backward()`` (reentrant checkpointing)."""
        return False

    def plan_book_keeping(self) -> bool:
        """True if the norm pass keeps what ``accumulate_clipped_sum`` needs (no second pass)."""
        return False

    def batch_coupled_layers(self) -> List[str]:
        """Layers whose gradient couples samples (a second pass cannot clip them)."""
        return []

    def accumulate_clipped_sum(self, coef: torch.Tensor) -> bool:
        """Add ``sum_i coef_i g_i`` to ``p.grad`` from the kept activations; False if not kept."""
        return False

    def take_unmeasured_calls(self) -> List[nn.Module]:
        """Layers that ran in the forward pass but got no norm in the norm pass; forgets them."""
        return []


class ClippedSumOptimizer(Protocol):
    """The optimizer side of ghost clipping, as the loss uses it
    (``DPOptimizerFastGradientClipping`` implements it)."""

    max_grad_norm: float

    def prepare_clipped_backward(self, params: List[nn.Parameter]) -> None:
        """Before a DP-loss backward: refuse or reset what the pass must not add to."""

    def record_clipped_backward(self) -> None:
        """After it: ``p.grad`` now holds a clipped sum."""

    def clipped_backwards_pending(self) -> int:
        """Clipped backward passes whose sums wait in ``p.grad`` for the next step."""


def _ghost_module(module) -> ClippedSumHooks:
    # A data-parallel wrapper (DPDDP, DDP) holds the GradSampleModuleFastGradientClipping in
    # ``.module`` and does not forward attribute access to it.
    inner = module
    while not isinstance(inner, ClippedSumHooks) and isinstance(
        getattr(inner, "module", None), nn.Module
    ):
        inner = inner.module
    if not isinstance(inner, ClippedSumHooks):
        raise TypeError(
            f"{type(module).__name__} is not a GradSampleModuleFastGradientClipping (no "
            "ClippedSumHooks): wrap the model with grad_sample_mode='ghost' before using "
            "DPLossFastGradientClipping"
        )
    return inner


_GhostModule = ClippedSumHooks
#: ``clip_bound(per_sample_norms) -> C``: the bound of this step, chosen between the passes.
ClipBoundRule = Callable[[torch.Tensor], float]


def _plan_book_keeping(wrapper, module, loss_per_sample: torch.Tensor) -> bool:
    """Whether the norm pass book-keeps; the module sees the loss's graph while it plans."""
    if loss_per_sample.numel() == 0 or _under_torch_ddp(wrapper, module):
        return False
    module.norm_pass_root = loss_per_sample.grad_fn
    try:
        return module.plan_book_keeping()
    finally:
        module.norm_pass_root = None  # it keeps the whole graph alive


def double_backward(
    module: _GhostModule,
    optimizer: ClippedSumOptimizer,
    loss_per_sample: torch.Tensor,
    *,
    clip_bound: Optional[ClipBoundRule] = None,
) -> None:
    """The two backward passes of ghost clipping (module docstring); leaves the clipped sum in
    ``p.grad`` of every trainable parameter of ``module``.

    The clip bound is the optimizer's ``max_grad_norm`` (the attribute schedulers change), or
    ``clip_bound(norms)`` given the per-sample gradient norms of the first pass (adaptive
    clipping); it is copied into ``module.max_grad_norm`` before the coefficients are computed.
    """
    wrapper, module = module, _ghost_module(module)
    trainable = module.clipped_parameters()
    if not trainable:
        raise ValueError("double_backward: the module has no trainable parameters")
    if loss_per_sample.dim() != 1:
        raise ValueError(
            f"double_backward: loss_per_sample must have shape (batch,), got "
            f"{tuple(loss_per_sample.shape)}; reduce extra dims first (DPLossFastGradientClipping "
            "does, see per_sample_loss)"
        )
    _check_accumulation_allowed(module, optimizer)
    optimizer.prepare_clipped_backward(trainable)
    module.enable_hooks()
    # Book-keeping replaces the second pass, except under torch DDP, whose gradient all-reduce
    # is driven by the backward pass itself.
    book_keeping = _plan_book_keeping(wrapper, module, loss_per_sample)
    coupled = [] if book_keeping else module.batch_coupled_layers()
    if coupled:
        raise NotImplementedError(
            "ghost clipping: the second backward pass cannot clip "
            + ", ".join(f"'{name}'" for name in coupled)
            + " (scale_grad_by_freq counts lookups over the whole batch, so samples are "
            "coupled) and this model cannot book-keep (every trainable layer must be an "
            "nn.Linear or nn.Embedding called once per forward): use grad_sample_mode='hooks' "
            "or scale_grad_by_freq=False"
        )
    used = _norm_pass_of_sample_losses(module, trainable, loss_per_sample, book_keeping)
    _check_every_hook_fired(module)
    if used is not None and module.measures_every_parameter():
        _check_every_used_parameter_has_a_norm(module, used)
    bound = optimizer.max_grad_norm if clip_bound is None else clip_bound(module.get_norm_sample())
    module.max_grad_norm = bound
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
    # The optimizer refuses p.grad left by a plain, unclipped backward() otherwise.
    optimizer.record_clipped_backward()


def _norm_pass_of_sample_losses(module, trainable, loss_per_sample, book_keeping: bool):
    """``_norm_pass`` of the *summed* per-sample losses, whatever ``loss_reduction``: each
    output gradient is then that sample's own (the hooks take this pass as ``"sum"``), so no
    ``"mean"`` factor ``B`` multiplies the norms of every parameter or the book-kept clipping
    coefficients.  Only norms and backprops come out of this pass, never a parameter gradient,
    so its loss's scale is free to choose."""
    kwargs = getattr(module, "_backprops_hook_kwargs", None)
    if kwargs is None:  # hooks of another kind: the loss as the module's reduction says
        batch_loss = _batch_loss(loss_per_sample, module.loss_reduction)
        return _norm_pass(module, trainable, batch_loss, retain=not book_keeping)
    module._backprops_hook_kwargs = {**kwargs, "loss_reduction": "sum"}
    try:
        return _norm_pass(module, trainable, loss_per_sample.sum(), retain=not book_keeping)
    finally:
        module._backprops_hook_kwargs = kwargs


def _check_accumulation_allowed(module, optimizer) -> None:
    """With Poisson sampling (``forbid_grad_accumulation``) one step releases one batch: a
    second DP-loss backward pass before the step would add another batch's clipped sum that the
    accountant never records."""
    if optimizer.clipped_backwards_pending() and not module.grad_accumulation_allowed:
        raise ValueError(
            "ghost clipping: a second DP loss backward pass before optimizer.step() would "
            "accumulate two batches into one step, but gradient accumulation is forbidden "
            "(Poisson sampling gives batches of varying size): call optimizer.step() and "
            "optimizer.zero_grad() after each backward pass, or use "
            "opacus.utils.batch_memory_manager.BatchMemoryManager for large batches."
        )


def _norm_pass(
    module, trainable: List[nn.Parameter], batch_loss: torch.Tensor, *, retain: bool
) -> Optional[List[nn.Parameter]]:
    """Run every hook once (the per-sample norms) without touching ``p.grad``.

    Returns the trainable parameters that the loss reached, or None where the pass does not
    tell (the anchored shortcut, which computes no parameter gradient at all).
    """
    # Asking for the gradients just below the hooked layers' output-hook nodes runs every hook
    # but prunes the weight-gradient branches; otherwise the parameter gradients are returned
    # (not stored) and dropped.
    anchors = module.first_pass_anchors()
    if module.norm_pass_needs_backward():
        # Reentrant checkpointing re-runs its segments inside the engine and refuses .grad():
        # a real backward, after which p.grad gets back what it held (the clipped sums of
        # earlier passes, or None).
        del anchors
        held = [p.grad for p in trainable]
        for p in trainable:
            p.grad = None
        try:
            batch_loss.backward(retain_graph=retain)
            return [p for p in trainable if p.grad is not None]
        finally:
            for p, grad in zip(trainable, held):
                p.grad = grad
    if anchors:
        # Book-keeping keeps every anchor's gradient (the layers' backprops) anyway: asking for
        # all of them holds nothing more and saves the walk that finds the lowest.  Not where a
        # layer may keep its per-sample gradient instead: its backprops should go at once.
        keep_all = not retain and not getattr(module, "may_keep_grads", lambda: False)()
        targets = anchors if keep_all else _lowest_anchors(anchors)
        # The anchors keep their calls' graphs alive: released right after the pass so that
        # calls whose output the loss never used are recognised as such.
        del anchors
        torch.autograd.grad(batch_loss, targets, retain_graph=retain, allow_unused=True)
        return None
    grads = torch.autograd.grad(batch_loss, trainable, retain_graph=retain, allow_unused=True)
    return [p for p, g in zip(trainable, grads) if g is not None]


def _check_every_used_parameter_has_a_norm(module, used: List[nn.Parameter]) -> None:
    """A parameter the loss reached but no hook measured would count as norm 0: its samples
    would be clipped too little (a privacy breach), so refuse, naming it."""
    missing = {id(p) for p in used if getattr(p, "_norm_sample", None) is None}
    if not missing:
        return
    names = [
        name.replace("_module.", "", 1)
        for name, p in module.hooked_model().named_parameters()
        if id(p) in missing
    ]
    raise RuntimeError(
        "ghost clipping: no per-sample norm was computed for parameter(s) "
        + ", ".join(f"'{n}'" for n in names)
        + ", which the loss depends on; clipping without them would under-clip. Their layer "
        "has no hooks (unsupported layer with strict=False?) or ran outside the hooked "
        "forward pass: use a supported layer, or freeze those parameters."
    )


def _under_torch_ddp(wrapper, ghost) -> bool:
    """True if a torch ``DistributedDataParallel`` wraps the ghost module or is wrapped by it."""
    chain = [wrapper]
    while chain[-1] is not ghost and isinstance(getattr(chain[-1], "module", None), nn.Module):
        chain.append(chain[-1].module)
    chain.append(ghost.wrapped_model())
    return any(isinstance(m, nn.parallel.DistributedDataParallel) for m in chain)


def _check_every_hook_fired(module) -> None:
    """Refuse to clip when a layer that ran in the forward pass got no norm in the first pass.

    Its norm would silently count as zero, so its samples would be clipped too little (a privacy
    breach). This happens on the parameter-gradient fallback path when a hooked layer's backward
    hook never runs, e.g. the first layer when the model input itself requires grad, or when a
    forward pass ran without its backward.
    """
    # Calls whose output the loss never used contribute 0 and are not counted.
    leftover = module.take_unmeasured_calls()
    if not leftover:
        return
    names = {
        id(m): name.replace("_module.", "", 1) for name, m in module.hooked_model().named_modules()
    }
    listed = ", ".join(
        f"'{names.get(id(m), type(m).__name__)}' ({type(m).__name__})" for m in leftover
    )
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


def _operand(owner, other, op: str):
    """``other``'s per-sample losses if it is a DP tensor (same reduction), else ``other``."""
    if not isinstance(other, DPTensorFastGradientClipping):
        return other
    if op in ("*", "/"):
        raise TypeError(
            f"{type(owner).__name__} {op} {type(other).__name__} is not defined: per-sample "
            "losses can be added or subtracted, and scaled by numbers or tensors"
        )
    if other.loss_reduction != owner.loss_reduction:
        raise ValueError(
            f"cannot combine DP losses with loss_reduction={owner.loss_reduction!r} and "
            f"{other.loss_reduction!r}: build both with the same loss_reduction"
        )
    return other.loss_per_sample


class DPTensorFastGradientClipping(object):
    """A per-sample loss whose ``backward()`` runs ghost clipping's double backward.

    The constructor only stores its arguments.  Behaves like the reduced loss for logging
    (``item()``, ``detach()``, ``str``); ``+``, ``-`` (with numbers, tensors or another DP
    tensor of the same reduction), ``*``, ``/`` (by numbers or tensors) and unary ``-`` act on
    the per-sample losses and return a DP tensor of the same class, module, optimizer and
    reduction.

    Args:
        module: the model wrapped for ghost clipping.
        optimizer: the ghost clipping DP optimizer.
        loss_per_sample: the loss of each sample, ``(batch,)``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the samples of the batch.
    """

    def __init__(
        self,
        module: _GhostModule,
        optimizer: ClippedSumOptimizer,
        loss_per_sample: torch.Tensor,
        loss_reduction: str = "mean",
    ):
        self.module = module
        self.optimizer = optimizer
        self.loss_per_sample = loss_per_sample
        self.loss_reduction = loss_reduction

    def item(self) -> float:
        """The reduced (``mean`` or ``sum``) loss as a Python float."""
        return float(self.detach().item())

    def detach(self) -> torch.Tensor:
        """The reduced loss, detached from the graph."""
        _check_reduction(self.loss_reduction, type(self).__name__)
        return _batch_loss(self.loss_per_sample.detach(), self.loss_reduction)

    def __str__(self):
        value = (
            self.detach()
            if self.loss_reduction in _REDUCTIONS
            else self.loss_per_sample.detach()  # never raise from repr
        )
        return f"{type(self).__name__}(loss={value!r}, reduction={self.loss_reduction!r})"

    __repr__ = __str__

    # ---------------------------------------------------------------- arithmetic
    def _with_loss(self, loss_per_sample: torch.Tensor) -> "DPTensorFastGradientClipping":
        # A shallow copy keeps the subclass and its settings (adaptive clipping's knobs).
        result = copy.copy(self)
        result.loss_per_sample = loss_per_sample
        return result

    def __add__(self, other):
        return self._with_loss(self.loss_per_sample + _operand(self, other, "+"))

    def __radd__(self, other):
        return self._with_loss(_operand(self, other, "+") + self.loss_per_sample)

    def __sub__(self, other):
        return self._with_loss(self.loss_per_sample - _operand(self, other, "-"))

    def __rsub__(self, other):
        return self._with_loss(_operand(self, other, "-") - self.loss_per_sample)

    def __mul__(self, other):
        return self._with_loss(self.loss_per_sample * _operand(self, other, "*"))

    def __rmul__(self, other):
        return self._with_loss(_operand(self, other, "*") * self.loss_per_sample)

    def __truediv__(self, other):
        return self._with_loss(self.loss_per_sample / _operand(self, other, "/"))

    def __neg__(self):
        return self._with_loss(-self.loss_per_sample)

    # ---------------------------------------------------------------- backward
    def _check_module_reduction(self) -> None:
        _check_reduction(self.loss_reduction, type(self).__name__)
        module_reduction = _ghost_module(self.module).loss_reduction
        if isinstance(module_reduction, str) and module_reduction != self.loss_reduction:
            raise ValueError(
                f"{type(self).__name__}: loss_reduction={self.loss_reduction!r} differs from the "
                f"module's loss_reduction={module_reduction!r}: wrap the module and the loss with "
                "the same"
            )

    def backward(self):
        """Double backward: afterwards ``p.grad`` holds the sum of clipped per-sample gradients."""
        self._check_module_reduction()
        double_backward(self.module, self.optimizer, self.loss_per_sample)


class DPLossFastGradientClipping(object):
    """Wraps a criterion so that ``criterion(output, target).backward()`` clips (ghost clipping).

    ``criterion`` is a loss module with a ``reduction`` attribute (a copy with
    ``reduction="none"`` is used) or a function returning unreduced losses.  ``loss_reduction``
    says how the batch loss combines the per-sample losses.  Sample ``i``'s loss is the
    criterion on that sample alone: losses with extra dims (per-token losses of a sequence) are
    reduced over them with the criterion's own reduction (``"mean"``/``"sum"``; for a function
    or ``reduction="none"``, with ``loss_reduction``), and ``nn.CrossEntropyLoss``/``nn.NLLLoss``
    average only over the tokens whose label is not ``ignore_index`` (weighted by ``weight``).

    Args:
        module: the model wrapped for ghost clipping.
        optimizer: the ghost clipping DP optimizer.
        criterion: the loss function (a module with ``reduction``, or a function returning one loss
            per sample).
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the samples of the batch.

    Raises:
        ValueError: ``loss_reduction`` is neither ``"mean"`` nor ``"sum"``.
    """

    def __init__(
        self,
        module: _GhostModule,
        optimizer: ClippedSumOptimizer,
        criterion,
        loss_reduction: str = "mean",
    ):
        _check_reduction(loss_reduction, type(self).__name__)
        module_reduction = _ghost_module(module).loss_reduction
        if isinstance(module_reduction, str) and module_reduction != loss_reduction:
            raise ValueError(
                f"{type(self).__name__}: loss_reduction={loss_reduction!r} differs from the "
                f"module's loss_reduction={module_reduction!r}: wrap the module and the loss with "
                "the same"
            )
        criterion_reduction = getattr(criterion, "reduction", None)
        if criterion_reduction is not None:
            criterion = copy.copy(criterion)
            criterion.reduction = "none"
        self.module = module
        self.optimizer = optimizer
        self.criterion = criterion
        self.loss_reduction = loss_reduction
        self.sample_reduction = (
            criterion_reduction if criterion_reduction in _REDUCTIONS else loss_reduction
        )
        self._warned_extra_dims = False

    def _per_sample_losses(self, input, target, shape=None) -> torch.Tensor:
        """``(batch,)``: sample ``i``'s ``criterion(input_i, target_i)`` (class docstring)."""
        loss = self.criterion(input, target)
        if shape is not None or loss.dim() > 1:
            self._warn_extra_dims(loss, shape)
        weights = None
        if self.sample_reduction == "mean" and (shape is not None or loss.dim() > 1):
            # Only a loss with extra dims is averaged (one loss per sample needs no weights).
            weights = _mean_weights(self.criterion, target)
        return per_sample_loss(loss, self.sample_reduction, shape, weights)

    def _warn_extra_dims(self, loss: torch.Tensor, shape) -> None:
        if self._warned_extra_dims:
            return
        self._warned_extra_dims = True
        how = f"{self.sample_reduction} over their extra dimensions"
        if self.sample_reduction == "mean" and isinstance(
            self.criterion, (nn.CrossEntropyLoss, nn.NLLLoss)
        ):
            how += " (ignore_index labels left out, class weights applied)"
        logger.warning(
            "DPLossFastGradientClipping: the criterion returned losses of shape %s for a batch "
            "of %d; each sample's losses are reduced to one by their %s, so that each sample "
            "is clipped as one (the loss of that sample alone). Logged once.",
            tuple(loss.shape),
            shape[0] if shape is not None else loss.shape[0],
            how,
        )

    def __call__(
        self, input, target, shape: Optional[Sequence[int]] = None
    ) -> DPTensorFastGradientClipping:
        """Per-sample losses of ``criterion(input, target)`` as a ``DPTensorFastGradientClipping``.

        ``shape``: the ``(batch, ...)`` shape that ``input`` was flattened from, if any.
        """
        loss = self._per_sample_losses(input, target, shape)
        return DPTensorFastGradientClipping(self.module, self.optimizer, loss, self.loss_reduction)

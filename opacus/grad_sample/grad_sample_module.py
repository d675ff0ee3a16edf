"""Per-sample gradients from module hooks: ``GradSampleHooks`` and its wrapper ``GradSampleModule``.

A forward hook keeps each trainable layer's (detached) inputs and registers a hook on that call's
output tensor, which receives the gradient of the loss with respect to it; the layer's grad sampler
(or the ``torch.func`` fallback) turns the pair into per-sample gradients.  Each output hook knows
its own call, so a call whose output the loss does not use never pairs its inputs with another
call's gradient (a module-level backward hook can only pair them by order).  Contributions of
one backward pass (several calls of a layer, e.g. RNN time steps, or parameters shared by several
layers) are summed per sample into ``p._current_grad_sample``; when the autograd engine finishes
the pass it becomes that pass's chunk of ``p.grad_sample``: the first pass after a reset leaves a
tensor ``(batch, *p.shape)``, later passes make it a list of one tensor per pass (rows of
different passes are different samples and are never added together).
"""

import collections
import functools
import inspect
import logging
import warnings
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from opacus.grad_sample import registry
from opacus.grad_sample.batch_gradients import BatchGradientSwitch
from opacus.grad_sample.batch_norm import (
    compute_eval_batch_norm_grad_sample,
    is_batch_norm,
    uses_batch_statistics,
)
from opacus.grad_sample.buffers import is_unshared_buffer
from opacus.grad_sample.call_capture import CallCapture
from opacus.grad_sample.embedding import (
    compute_embedding_grad_sample,
    compute_embeddingbag_gradsampler,
    embedding_bookkeeping,
    embeddingbag_bookkeeping,
)
from opacus.grad_sample.functorch import (
    FT_COMPUTE_SAMPLE_GRAD_ATTR,
    _check_preparable,
    ft_compute_per_sample_gradient,
    per_sample_gradient,
    prepare_layer,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleHooks, AbstractGradSampleModule
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.grad_sample.module_utils import (
    has_trainable_params,
    requires_grad,
    trainable_modules,
    trainable_parameters,
)
from opacus.grad_sample.pass_state import (
    DeferredContractions,
    NormBook,
    PassRecord,
    ReductionScale,
)
from opacus.grad_sample.registry import SUMS_OVER_SEQUENCE_ATTR
from opacus.grad_sample.safety_checks import (
    SKIP_BATCH_MIXING_CHECK_ATTR,
    ModelStructure,
    batch_mixing_mismatch,
)
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN, DPRNNBase, RNNLinear

__all__ = [
    "AbstractGradSampleHooks",
    "AbstractGradSampleModule",
    "DPGRU",
    "DPLSTM",
    "DPRNN",
    "RNNLinear",
    "GradSampleHooks",
    "GradSampleModule",
    "create_or_accumulate_grad_sample",
    "ft_compute_per_sample_gradient",
    "has_trainable_params",
    "prepare_layer",
    "promote_current_grad_sample",
    "requires_grad",
    "trainable_modules",
    "trainable_parameters",
]

logger = logging.getLogger(__name__)


def create_or_accumulate_grad_sample(
    *, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int
) -> None:
    """Add ``grad_sample`` (shape ``(b, *param.shape)``) into ``param._current_grad_sample``.

    The first contribution of a backward pass creates ``_current_grad_sample`` with
    ``max_batch_len`` rows; later ones (repeated calls of the layer) are added into their first
    ``b`` rows: packed sequences shrink the batch of later time steps to the sequences still
    running, which are the first ones.

    Args:
        param: the parameter.
        grad_sample: per-sample gradients ``(b, *param.shape)``.
        max_batch_len: the batch size of the pass (rows of the stored tensor).

    Raises:
        ValueError: ``grad_sample`` has more rows than ``max_batch_len`` or the wrong shape.
    """
    if grad_sample.dtype != param.dtype and grad_sample.is_floating_point():
        # A sampler fed autocast's bf16 tensors may answer in bf16; p.grad is in p's dtype.
        grad_sample = grad_sample.to(param.dtype)
    batch = grad_sample.shape[0]
    if batch > max_batch_len:
        raise ValueError(
            f"per-sample gradient with {batch} rows exceeds max_batch_len={max_batch_len} for a "
            f"parameter of shape {tuple(param.shape)}"
        )
    current = getattr(param, "_current_grad_sample", None)
    if current is None:
        if batch == max_batch_len:
            # Samplers return fresh tensors; only strided views (e.g. the expanded gradient of
            # ``sum()``) get materialised.
            param._current_grad_sample = grad_sample.contiguous()
        else:
            current = grad_sample.new_zeros((max_batch_len, *grad_sample.shape[1:]))
            current[:batch] = grad_sample
            param._current_grad_sample = current
    elif grad_sample is current:
        pass  # the sampler added its contribution into ``current`` itself (a tied embedding)
    elif batch == current.shape[0]:
        if is_unshared_buffer(current):
            current.add_(grad_sample)  # a pooled buffer nobody else sees: no fresh tensor
        else:
            # Out of place: the first contribution may alias a tensor autograd still owns.
            param._current_grad_sample = current + grad_sample
    else:
        param._current_grad_sample = torch.cat([current[:batch] + grad_sample, current[batch:]])


def promote_current_grad_sample(p: nn.Parameter) -> None:
    """Move ``p._current_grad_sample`` (one finished backward pass) into ``p.grad_sample``.

    The first pass after a reset makes ``grad_sample`` that tensor; a later one turns it into
    the list ``[first, second]`` and further ones append: each element holds the samples of one
    pass (batch sizes may differ).  Adding rows of two passes would add the gradients of two
    unrelated samples, which clipping could then no longer bound.

    Args:
        p: the parameter.
    """
    current = p._current_grad_sample
    del p._current_grad_sample
    existing = getattr(p, "grad_sample", None)
    if existing is None:
        p.grad_sample = current
    elif isinstance(existing, list):
        existing.append(current)
    elif isinstance(existing, tuple):
        p.grad_sample = [*existing, current]
    else:
        p.grad_sample = [existing, current]


# Read by the optimizer (opacus.optimizers.optimizer.cached_grad_sample_norms): see there.
GRAD_SAMPLE_NORMS_ATTR = "_grad_sample_norms"
_EXACT_NORM_DTYPES = (torch.float32, torch.float64)


def _scale_input_instead(module: nn.Module, sampler, activations: List, backprops) -> bool:
    """True if the "mean" factor is cheaper applied to the input: an ``nn.Linear`` without a
    trainable bias (a language model's head, 16x more outputs than inputs), whose per-sample
    gradient ``sum_t b_t a_t^T`` is bilinear in its input and output gradient."""
    bias = getattr(module, "bias", None)
    return (
        sampler is compute_linear_grad_sample
        and len(activations) == 1
        and (bias is None or not bias.requires_grad)
        and activations[0].numel() < backprops.numel()
    )


def _bookkept_linear_norms(
    module: nn.Module,
    sampler,
    activations: List,
    backprops: torch.Tensor,
    max_batch_len: int,
) -> Optional[Dict[nn.Parameter, tuple]]:
    """Exact per-sample norms (and factors) of a 2-D-input ``nn.Linear``'s per-sample gradients.

    Book-keeping (Bu et al. 2023, "Differentially private optimization on large model at small
    cost"): with one position per sample the weight gradient is the outer product ``b_i a_i^T``,
    whose Frobenius norm is ``||a_i|| ||b_i||``, and the clipped sum ``sum_i f_i b_i a_i^T`` is
    the matmul ``(f * B)^T A``; the bias gradient is ``b_i``.  Both come from the small
    activations/backprops and spare the optimizer two passes over the ``(B, out, in)`` gradient.
    Sequences (``T > 1``) are skipped: their norm needs ``T x T`` Gram matrices; half precision
    is skipped because the stored gradient is rounded after the product.

    The norms and the clipped sum are those of ghost clipping's book-keeping (the layer's
    ``NORM_SAMPLERS`` and ``CLIPPED_SUM_SAMPLERS`` entries): one implementation for both paths.

    Returns ``{param: (norms (B,), clipped_sum)}`` where ``clipped_sum(factors)`` is
    ``sum_i factors[i] * grad_sample[i]`` computed without the gradient (None for the bias, whose
    gradient is as small as the backprops), or None where the layer does not qualify.
    """
    if sampler is not compute_linear_grad_sample or len(activations) != 1:
        return None
    a = activations[0]
    params = [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]
    if (
        a.dim() != 2
        or backprops.dim() != 2
        or max_batch_len == 0  # nothing to spare on an empty batch
        or a.shape[0] != max_batch_len
        or backprops.shape[0] != max_batch_len
        or any(
            t.dtype != p.dtype or p.dtype not in _EXACT_NORM_DTYPES
            for p in params
            for t in (a, backprops)
        )
    ):
        return None
    # float32 or float64, the dtype the optimizer would compute these norms in.
    norms = registry.NORM_SAMPLERS[nn.Linear](module, activations, backprops)
    out = {}
    if module.weight in norms:
        versions = [t._version for t in (a, backprops)]
        clipped_sum = functools.partial(
            _linear_clipped_weight_sum, module, activations, backprops, versions
        )
        out[module.weight] = (norms[module.weight], clipped_sum)
    if module.bias is not None and module.bias in norms:
        out[module.bias] = (norms[module.bias], None)
    return out


def _bookkept_norms(
    module: nn.Module, sampler, activations: List, backprops: torch.Tensor, max_batch_len: int
) -> Optional[Dict[nn.Parameter, tuple]]:
    """Book-kept norms (see ``_bookkept_linear_norms``) of a 2-D-input ``nn.Linear``, an
    ``nn.Embedding`` or an ``nn.EmbeddingBag`` (``opacus.grad_sample.embedding``), by the
    layer's grad sampler; else None."""
    if sampler is compute_embedding_grad_sample:
        return embedding_bookkeeping(module, activations, backprops, max_batch_len)
    if sampler is compute_embeddingbag_gradsampler:
        return embeddingbag_bookkeeping(module, activations, backprops, max_batch_len)
    return _bookkept_linear_norms(module, sampler, activations, backprops, max_batch_len)


def _linear_clipped_weight_sum(
    module, activations, backprops, versions, factors
) -> Optional[torch.Tensor]:
    """``sum_i factors[i] * outer(b[i], a[i])``: the book-kept clipped sum of the weight.

    None if the layer's input or output gradient was written in place since the backward pass
    (e.g. a batch buffer refilled before ``step()``): the sum would then mix the new values with
    norms of the old ones, i.e. not be clipped; the optimizer falls back to ``p.grad_sample``.
    """
    if [t._version for t in (activations[0], backprops)] != versions:
        return None
    return registry.CLIPPED_SUM_SAMPLERS[nn.Linear](module, activations, backprops, factors)[
        module.weight
    ]


def _concat_calls(
    activations: List[torch.Tensor], backprops: List[torch.Tensor], max_batch_len: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Join the calls of one layer along a sequence dim: ``(max_batch_len, sum_t T_t, d)``.

    A packed sequence's later steps see only the first ``b_t`` samples; their missing rows are
    zero in both tensors, so they add nothing to ``sum_t b_t a_t^T`` (the sampler's contraction).
    """
    a = [x.reshape(x.shape[0], -1, x.shape[-1]) for x in activations]
    b = [g.reshape(g.shape[0], -1, g.shape[-1]) for g in backprops]
    if all(x.shape[0] == max_batch_len for x in a):
        return torch.cat(a, dim=1), torch.cat(b, dim=1)

    def padded(parts):
        out = parts[0].new_zeros(
            (max_batch_len, sum(x.shape[1] for x in parts), parts[0].shape[-1]),
            dtype=functools.reduce(torch.promote_types, (x.dtype for x in parts)),
        )
        start = 0
        for x in parts:
            out[: x.shape[0], start : start + x.shape[1]] = x
            start += x.shape[1]
        return out

    return padded(a), padded(b)


def _batch_dim(module: nn.Module, batch_first: bool) -> int:
    # nn.EmbeddingBag's output is (bags, dim) whatever the layout of the rest of the model.
    if (
        batch_first
        or getattr(module, "_batch_dim_always_first", False)
        or isinstance(module, nn.EmbeddingBag)
    ):
        return 0
    return 1


class _OutputHook:
    """Tensor hook on one call's output: hands the gradient to the hooks object."""

    __slots__ = ("__weakref__", "owner", "module", "call")

    def __init__(self, owner, module: nn.Module, call: list):
        self.owner, self.module, self.call = owner, module, weakref.ref(call)

    def __call__(self, grad: torch.Tensor) -> None:
        self.owner._output_grad_hook(self.module, self.call, grad)


def _attach_output_hook(output: torch.Tensor, hook: _OutputHook) -> None:
    """``output.register_hook(hook)`` without its ``RemovableHandle`` (a third of the cost of a
    hooked call's capture): the hook is never removed, it lives and dies with the output's
    autograd node.  The hook object is its own key in the tensor's hook dict, so no handle id
    of a hook registered later can replace it.  Tensor subclasses (``__torch_function__``) and
    leaf outputs take ``register_hook`` itself."""
    grad_fn = output.grad_fn
    if type(output) is not torch.Tensor or grad_fn is None:
        output.register_hook(hook)
        return
    hooks = output._backward_hooks
    if hooks is None:
        hooks = output._backward_hooks = collections.OrderedDict()
        grad_fn._register_hook_dict(output)
    hooks[hook] = hook


def hookable_output(output) -> Optional[torch.Tensor]:
    """The output tensor whose gradient is the layer's backprops (the first one, for tuples)."""
    if isinstance(output, (tuple, list)):
        output = next((o for o in output if torch.is_tensor(o)), None)
    if torch.is_tensor(output) and output.requires_grad:
        return output
    return None


_FORWARD_HOOKS_CAN_ALWAYS_RUN = (
    "always_call" in inspect.signature(nn.Module.register_forward_hook).parameters
)


# The attribute the model carries while hooks are attached (the name Opacus 1.6 uses).
HOOKS_ATTR = "autograd_grad_sample_hooks"


class _HookHandles:
    """Several removable handles that count as one entry of ``autograd_grad_sample_hooks``."""

    def __init__(self, handles: Iterable = ()):
        self.handles = list(handles)

    def remove(self) -> None:
        """Remove every hook of the group (idempotent)."""
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()

    def __enter__(self) -> "_HookHandles":
        return self

    def __exit__(self, *args) -> None:
        self.remove()


@functools.lru_cache(maxsize=None)
def _positional_names(cls: type) -> Tuple[str, ...]:
    """The names of ``cls.forward``'s parameters that can be passed positionally."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(inspect.signature(cls.forward).parameters.values())[1:]  # after self
    return tuple(p.name for p in params if p.kind in kinds)


def _kwargs_to_args(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of every hooked layer: inputs passed by keyword (``layer(input=x)``,
    ``bag(idx, offsets=o, per_sample_weights=w)``) become positional, so that the capture hook,
    which sees positional inputs only, and the grad sampler see them. Left out, a keyword input
    was either an unclear error or, for an EmbeddingBag's ``per_sample_weights``, silently
    wrong per-sample gradients. Does nothing for calls without keywords."""
    if not kwargs:
        return None
    names = _positional_names(type(module))
    moved = [i for i, name in enumerate(names) if name in kwargs and i >= len(args)]
    if not moved:
        return None
    kwargs = dict(kwargs)
    merged = list(args) + [None] * (max(moved) + 1 - len(args))
    for i in moved:
        merged[i] = kwargs.pop(names[i])
    return tuple(merged), kwargs


def _walk_hook_targets(module: nn.Module, has_sampler: Callable[[nn.Module], bool]):
    """Yield the modules to hook, each covering its whole subtree (Opacus 1.6's walk).

    A module with a grad sampler is hooked and its sampler covers its subtree (a registered
    container need not own parameters itself).  A module that owns a trainable parameter
    directly but has no sampler is handled whole by ``torch.func``, its children's parameters
    included, so its children are not visited.  Otherwise the walk continues into the children
    (DP RNN containers own no parameters: their ``RNNLinear``s are hooked).
    """
    if not requires_grad(module, recurse=True):
        return
    if has_sampler(module) or _owns_trainable_params(module):
        yield module
        return
    for child in module.children():
        yield from _walk_hook_targets(child, has_sampler)


def _owns_trainable_params(module: nn.Module) -> bool:
    """True if ``module`` has a trainable parameter of its own, not merely an alias of one of
    its descendants' (as DP RNN containers register torch-style names for their children's
    parameters): such aliases are covered by the descendants' hooks."""
    if isinstance(module, DPRNNBase):
        return False
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if not own:
        return False
    below = {id(p) for child in module.children() for p in child.parameters()}
    return any(id(p) not in below for p in own)


class _ForgetCalls:
    """Removable handle of a module's output-gradient side: removing it drops the inputs its
    pending calls captured, so their output hooks (registered per call) do nothing."""

    def __init__(self, owner, module: nn.Module):
        self.owner = weakref.ref(owner)
        self.module = module

    def remove(self) -> None:
        """Forget the module's pending calls."""
        owner = self.owner()
        if owner is not None and "_capture" in vars(owner):
            owner._capture.forget([self.module])


def _check_not_hooked(model: nn.Module, who: str) -> None:
    if hasattr(model, HOOKS_ATTR):
        raise ValueError(
            f"{who}: the model already carries per-sample gradient hooks (attribute "
            f"'{HOOKS_ATTR}'): hooks are already attached, e.g. the same model was wrapped "
            "twice. Keep using the first wrapper, or remove its hooks first (remove_hooks(), "
            "cleanup() or to_standard_module())."
        )


class GradSampleHooks(AbstractGradSampleHooks):
    """Hooks that give every trainable parameter of ``m`` a per-sample gradient ``p.grad_sample``.

    The model is not wrapped: the hooks attach to ``m`` and its submodules directly
    (``GradSampleModule`` is the ``nn.Module`` wrapper around the same machinery).

    Args:
        m: the model.
        batch_first: True if layers see the batch on dim 0, False if on dim 1 (``(T, B, ...)``);
            layers whose class sets ``_batch_dim_always_first = True`` always use dim 0.
        loss_reduction: ``"mean"`` if the loss averages the per-sample losses, ``"sum"`` if it
            adds them up.
        strict: raise on layers whose per-sample gradients cannot be computed (else warn and
            leave them without hooks).
        force_functorch: use ``torch.func`` for every layer, even those with a grad sampler
            (``nn.EmbeddingBag`` and eval-mode BatchNorm keep their exact samplers: torch.func
            cannot take them).

    Each trainable parameter gets ``grad_sample`` (None until a backward pass; a tensor, or a
    list with one tensor per backward pass) and ``_forward_counter`` (calls whose output
    gradient is still to come).  The model gets ``autograd_grad_sample_hooks`` (two removable
    handles per hooked module) and every module handled by ``torch.func`` gets
    ``ft_compute_sample_grad``; ``remove_hooks()`` deletes them, ``cleanup()`` also deletes the
    per-parameter attributes.

    BatchNorm: refused while it normalises with batch statistics (training mode), which mixes
    samples and records statistics of private data; a BatchNorm in ``eval()`` mode (running
    statistics) is supported, and every training forward checks that it still is.

    Set ``compute_batch_gradients = False`` on the object to keep the hooked parameters out of the
    autograd graph: backward then computes their per-sample gradients but no ``p.grad`` (about
    half of a convolution's backward saved). ``PrivacyEngine.make_private`` does so in hooks and
    functorch modes outside data parallelism, since its optimizer replaces ``p.grad`` anyway.

    Safety checks (both raise instead of letting a silently wrong gradient through):

    * Sample mixing: the ``torch.func`` fallback is only right for layers whose output row ``i``
      depends on sample ``i`` alone. The first training forward (with hooks enabled and a batch
      of at least 2) of every layer without a grad sampler compares the batched output with the
      layer's outputs on single samples, once per layer, and raises naming the layer on a
      mismatch. Switch it off for the whole model with ``check_batch_mixing = False`` on this
      object, or for one layer (class or instance) with ``_opacus_skip_batch_mixing_check =
      True``. Random forwards (dropout) are not probed: the fallback refuses them anyway.
    * Structure: the submodules and trainable parameters are fingerprinted when the hooks are
      installed; a forward of a model changed since then (layers added, removed, replaced,
      parameters unfrozen) raises, listing the changes.
    """

    GRAD_SAMPLERS = registry.GRAD_SAMPLERS
    NORM_SAMPLERS = registry.NORM_SAMPLERS
    check_batch_mixing = True
    # False: hooked layers' parameters stay out of the autograd graph, so backward computes their
    # per-sample gradients but no p.grad (opacus.grad_sample.batch_gradients). PrivacyEngine sets
    # it for the models it wraps, whose optimizer replaces p.grad anyway.
    compute_batch_gradients = True
    _can_skip_batch_gradients = True

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first=True,
        loss_reduction="mean",
        strict: bool = True,
        force_functorch=False,
    ):
        _check_not_hooked(m, type(self).__name__)
        AbstractGradSampleHooks.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction
        )
        self.force_functorch = force_functorch
        self.hooks_enabled = False
        self._strict = strict
        # Ghost clipping's second pass needs p.grad: its hooks never switch parameters off. The
        # switch must restore requires_grad even when a forward raises (always_call, torch 2.1+).
        self._batch_gradient_switch = (
            BatchGradientSwitch(self)
            if self._can_skip_batch_gradients and _FORWARD_HOOKS_CAN_ALWAYS_RUN
            else None
        )
        self._reset_state()
        errors = self.validate(module=m, strict=strict)
        if errors:
            warnings.warn(
                "per-sample gradients will be missing for: " + "; ".join(str(e) for e in errors),
                stacklevel=2,
            )
        self._skipped = {id(mod) for _, mod, _ in self._unsupported_modules(m)}
        self.add_hooks(
            loss_reduction=loss_reduction,
            batch_first=batch_first,
            force_functorch=force_functorch,
        )

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        # The captured calls whose output gradient is still to come (call_capture.py).
        self._capture = CallCapture(self.hooked_parameters)
        self._samplers: Dict[nn.Module, Optional[Callable]] = {}
        self._module_names: Dict[nn.Module, str] = {}
        self._pass = PassRecord()
        # The per-pass concerns (opacus.grad_sample.pass_state): book-kept exact norms, and the
        # repeated calls of sequence-summing layers contracted once per backward.
        self._norm_book = NormBook()
        self._deferred = DeferredContractions()
        self._first_layer: Optional[Tuple[str, int]] = None
        self._called_this_forward: set = set()
        self._probed: set = set()
        self._structure: Optional[ModelStructure] = None
        # Every BatchNorm of the model (name, module): each forward checks they are in eval mode.
        self._batch_norms: List[Tuple[str, nn.Module]] = []

    # ------------------------------------------------------------- validation
    @classmethod
    def _sampler_for(cls, module: nn.Module, force_functorch: bool = False) -> Optional[Callable]:
        """The grad sampler of ``module``'s exact type (None: the ``torch.func`` fallback)."""
        if is_batch_norm(module):
            # Buffers rule out torch.func; the eval-mode sampler is exact (batch_norm.py).
            return compute_eval_batch_norm_grad_sample
        if force_functorch and not isinstance(module, nn.EmbeddingBag):
            # torch.func cannot take an EmbeddingBag (prepare_layer): it keeps its sampler.
            return None
        return cls.GRAD_SAMPLERS.get(type(module))

    @classmethod
    def _unsupported_modules(cls, module: nn.Module, force_functorch: bool = False):
        """Yield ``(name, submodule, reason)`` for submodules without per-sample gradients."""
        names = {sub: name or "<root>" for name, sub in module.named_modules()}
        for sub, path in names.items():
            if is_batch_norm(sub) and uses_batch_statistics(sub):
                # Even frozen: it normalises with (and records) statistics of the private batch.
                yield names[sub], sub, (
                    f"'{path}' ({type(sub).__name__}) is a BatchNorm layer in training mode: it "
                    "mixes the samples of a batch, so per-sample gradients are not defined, and "
                    "it records statistics of the private data without noise. Replace it with "
                    "GroupNorm (opacus.validators.ModuleValidator.fix(model) does so), or put it "
                    "in eval() mode (running statistics) for the whole training."
                )
        for sub, path in names.items():
            if isinstance(sub, nn.EmbeddingBag) and sub.mode == "max" and requires_grad(sub):
                yield path, sub, (
                    f"'{path}' (EmbeddingBag) has mode='max', whose per-sample gradients are not "
                    "supported: use mode='sum' or 'mean', or freeze its weight."
                )
        for target in _walk_hook_targets(
            module, lambda m: cls._sampler_for(m, force_functorch) is not None
        ):
            if cls._sampler_for(target, force_functorch) is not None or is_batch_norm(target):
                continue
            path = names[target]
            if isinstance(target, nn.RNNBase):
                yield path, target, (
                    f"'{path}' ({type(target).__name__}) has no per-sample gradient support: use "
                    "opacus.layers.DPRNN/DPLSTM/DPGRU (opacus.validators.ModuleValidator.fix)."
                )
                continue
            try:
                _check_preparable(target)
            except NotImplementedError as err:
                yield path, target, (
                    f"'{path}' ({type(target).__name__}) is trainable but has no registered "
                    f"grad sampler, and the functorch fallback cannot handle it ({err})"
                )

    @classmethod
    def validate(cls, module: nn.Module, *, strict: bool = False) -> List[NotImplementedError]:
        """Errors for every submodule whose per-sample gradients cannot be computed.

        With ``strict=True`` a non-empty list is raised as one ``NotImplementedError``.

        Args:
            module: the model to check.
            strict: raise the errors instead of returning them.

        Returns:
            the errors found (empty if none).

        Raises:
            NotImplementedError: ``strict`` is True and an error was found.
        """
        errors = [NotImplementedError(reason) for _, _, reason in cls._unsupported_modules(module)]
        if strict and errors:
            raise NotImplementedError(
                "Model contains layers without per-sample gradient support:\n"
                + "\n".join(str(e) for e in errors)
            )
        return errors

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        """True if ``module``'s type has a registered grad sampler (or is a DP RNN container).

        Args:
            module: the module to check.

        Returns:
            whether its per-sample gradients can be computed.
        """
        if type(module) in cls.GRAD_SAMPLERS:
            return True
        return isinstance(module, DPRNNBase)

    # ------------------------------------------------------------------ hooks
    def iterate_submodules(self, module: nn.Module) -> Iterable[nn.Module]:
        """Submodules to hook; each one's hook covers its whole subtree.

        A module whose type has a grad sampler is hooked (its sampler returns the gradients of
        its children's parameters too). A module owning a trainable parameter directly but
        without a sampler (or every such module, with ``force_functorch``) is handled whole by
        ``torch.func``, children included. Other modules are looked through.

        Args:
            module: the root module.

        Returns:
            the modules to hook.
        """
        force = self.force_functorch
        yield from _walk_hook_targets(module, lambda m: self._sampler_for(m, force) is not None)

    def add_hooks(
        self,
        *,
        loss_reduction: str = "mean",
        batch_first: bool = True,
        force_functorch: bool = False,
    ) -> None:
        """Install the hooks on every module ``iterate_submodules`` yields.

        The model gets the attribute ``autograd_grad_sample_hooks`` (also on this object): a list
        of removable handles, two per hooked module (its forward side and its output-gradient
        side). Every trainable parameter gets ``grad_sample = None`` and ``_forward_counter = 0``;
        each module handled by ``torch.func`` gets ``ft_compute_sample_grad``.

        Raises:
            ValueError: the model already carries hooks (wrapped twice).

        Args:
            loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch (per-sample
                gradients are rescaled for ``"mean"``).
            batch_first: True if the batch is dimension 0 of every layer's input and output, False
                for dimension 1.
            force_functorch: compute every per-sample gradient with ``torch.func`` instead of the
                layer's grad sampler.
        """
        root = self._module
        _check_not_hooked(root, type(self).__name__)
        self.force_functorch = force_functorch
        self.batch_first = batch_first
        names = {mod: name for name, mod in root.named_modules()}
        targets = self._hook_targets(root, names, batch_first, force_functorch)
        self._structure = ModelStructure(root)
        self._batch_norms = [
            (n or "<root>", m) for n, m in root.named_modules() if is_batch_norm(m)
        ]
        handles = []
        switch = self._batch_gradient_switch
        for index, (module, sampler) in enumerate(targets):
            self._module_names[module] = names.get(module, "") or "<root>"
            self._samplers[module] = sampler
            forward_side, gradient_side = [], [_ForgetCalls(self, module)]
            if index == 0:
                forward_side.append(root.register_forward_pre_hook(self._start_forward))
            if switch is not None:
                forward_side.append(module.register_forward_pre_hook(switch.before_forward))
                # Before the capture hook (which reads requires_grad), even if forward raises;
                # it also gives the output its gradient path (the output-gradient side).
                gradient_side.append(
                    module.register_forward_hook(switch.after_forward, always_call=True)
                )
            forward_side.append(module.register_forward_pre_hook(_kwargs_to_args, with_kwargs=True))
            forward_side.append(module.register_forward_hook(self.capture_activations_hook))
            handles += [_HookHandles(forward_side), _HookHandles(gradient_side)]
        # The output hooks registered at each call pass these on to capture_backprops_hook.
        self._backprops_hook_kwargs = {"loss_reduction": loss_reduction, "batch_first": batch_first}
        setattr(root, HOOKS_ATTR, handles)
        self.autograd_grad_sample_hooks = handles
        for p in self._trainable_params():
            p.grad_sample = None
            p._forward_counter = 0
        self.enable_hooks()

    def _hook_targets(self, root, names, batch_first, force_functorch) -> list:
        """``(module, sampler)`` for every module to hook; ``sampler`` None means ``torch.func``
        (``prepare_layer`` done). An unsupported layer raises, or is skipped with a warning
        when not strict."""
        targets = []
        for module in self.iterate_submodules(root):
            if id(module) in getattr(self, "_skipped", ()):
                continue
            sampler = self._sampler_for(module, force_functorch)
            if sampler is None:
                try:
                    prepare_layer(module, batch_first=batch_first)
                except NotImplementedError as err:
                    self._unsupported_layer(err, names.get(module), module, targets)
                    continue
            targets.append((module, sampler))
        return targets

    def _unsupported_layer(self, err, name, module, targets) -> None:
        if getattr(self, "_strict", True):
            self._remove_ft_attributes([m for m, _ in targets])
            raise NotImplementedError(
                f"{type(self).__name__}: layer '{name or '<root>'}' "
                f"({type(module).__name__}) cannot get per-sample gradients: {err}"
            ) from err
        warnings.warn(
            f"per-sample gradients will be missing for '{name}': {err}",
            stacklevel=4,
        )

    def hooked_parameters(self, module: nn.Module) -> Iterable[nn.Parameter]:
        """The parameters whose per-sample gradients ``module``'s hook computes (its subtree)."""
        return module.parameters()

    def _remove_ft_attributes(self, modules: Iterable[nn.Module]) -> None:
        for module in modules:
            if FT_COMPUTE_SAMPLE_GRAD_ATTR in vars(module):
                delattr(module, FT_COMPUTE_SAMPLE_GRAD_ATTR)

    def remove_hooks(self) -> None:
        """Disable and remove every hook, delete ``autograd_grad_sample_hooks`` (from the model
        and this object) and ``ft_compute_sample_grad``; drop the captured activations."""
        self.disable_hooks()
        handles = getattr(self, HOOKS_ATTR, None)
        for handle in handles or ():
            handle.remove()
        if HOOKS_ATTR in vars(self):
            delattr(self, HOOKS_ATTR)
        root = self._module
        if HOOKS_ATTR in vars(root) and (handles is None or vars(root)[HOOKS_ATTR] is handles):
            delattr(root, HOOKS_ATTR)
        self._remove_ft_attributes(root.modules())
        for p in root.parameters():
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample
            if hasattr(p, GRAD_SAMPLE_NORMS_ATTR):
                delattr(p, GRAD_SAMPLE_NORMS_ATTR)
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0
        self._reset_state()

    def disable_hooks(self) -> None:
        """Stop capturing (the hooks stay installed): backward passes only compute ``p.grad``."""
        self.hooks_enabled = False

    def enable_hooks(self) -> None:
        """Resume capturing activations and computing per-sample gradients."""
        self.hooks_enabled = True

    def _start_forward(self, module: nn.Module, _inputs) -> None:
        if self._structure is not None:
            self._structure.check(type(self).__name__)
        if self.hooks_enabled and torch.is_grad_enabled():
            self._check_batch_norms()
        self._capture.prune_orphans()
        self._first_layer = None
        self._called_this_forward = set()
        if self._pass.finish_queued:  # the last backward raised before it finished
            self._drop_pending()

    def _check_batch_norms(self) -> None:
        training = [
            f"'{name}' ({type(bn).__name__})"
            for name, bn in self._batch_norms
            if uses_batch_statistics(bn)
        ]
        if training:
            raise RuntimeError(
                f"{type(self).__name__}: BatchNorm layer(s) {', '.join(training)} would normalise "
                "this training forward pass with batch statistics (training mode, e.g. after "
                "model.train()): that mixes the samples of the batch and records statistics of "
                "the private data without noise, which breaks the DP guarantee. Call .eval() on "
                "every BatchNorm after model.train() (running statistics, fixed and public), or "
                "replace them with GroupNorm (opacus.validators.ModuleValidator.fix(model))."
            )

    def _batch_size(self, module: nn.Module, activations: list, output) -> Optional[int]:
        if isinstance(module, nn.EmbeddingBag):
            return self._bags(module, activations, output)
        dim = _batch_dim(module, self.batch_first)
        for t in [*activations, output]:
            if torch.is_tensor(t) and t.dim() > dim:
                return t.shape[dim]
        return None

    def _bags(self, module: nn.EmbeddingBag, activations: list, output) -> int:
        """An EmbeddingBag's batch is its number of bags: one per offset with a 1-D input."""
        index = activations[0] if activations else None
        if torch.is_tensor(index) and index.dim() == 1:
            offsets = activations[1] if len(activations) > 1 else None
            if not torch.is_tensor(offsets):
                raise ValueError(
                    f"layer '{self._module_names[module]}' (EmbeddingBag) got a 1-D input without "
                    "offsets: pass them, bag(input, offsets), so that the hooks can tell the bags "
                    "(the samples) apart"
                )
            return offsets.shape[0] - (1 if module.include_last_offset else 0)
        return output.shape[0]

    def _training_forward(self, module: nn.Module) -> bool:
        # A BatchNorm kept in eval() inside a model in training mode is trained (its affine
        # parameters) with its running statistics: its calls are captured too.
        return module.training or (is_batch_norm(module) and self._module.training)

    def capture_activations_hook(
        self,
        module: nn.Module,
        forward_input: List[torch.Tensor],
        _forward_output: torch.Tensor,
    ):
        """Forward hook: keep the layer's detached inputs (one list per call).

        Args:
            module: the layer the hook belongs to.
            forward_input: the layer's positional inputs.
            _forward_output: the layer's output (unused).

        Raises:
            ValueError: the layer is called while its per-sample gradients of an earlier pass are
                still pending.
        """
        self._capture_call(module, forward_input, _forward_output)

    def _capture_call(self, module: nn.Module, forward_input, _forward_output):
        """``capture_activations_hook``'s work; returns the captured call, or None if the call
        is not captured (a forward hook must return None: a value would replace the output)."""
        if (
            not self.hooks_enabled
            or not self._training_forward(module)
            or not torch.is_grad_enabled()
            or not any(p.requires_grad for p in self.hooked_parameters(module))
        ):
            return None
        activations = [a.detach() if torch.is_tensor(a) else a for a in forward_input]
        batch = self._batch_size(module, activations, _forward_output)
        if batch is None:
            raise ValueError(
                f"layer '{self._module_names[module]}' ({type(module).__name__}) got no tensor "
                f"with a batch dimension (batch_first={self.batch_first})"
            )
        self._check_batch_size(module, batch)
        if batch >= 2 and module not in self._probed:
            self._probe_batch_mixing(module, activations, _forward_output)
        call = self._capture.capture(module, activations, batch)
        output = hookable_output(_forward_output)
        if output is not None:
            hook = _OutputHook(self, module, call)
            call.hook = weakref.ref(hook)
            _attach_output_hook(output, hook)
        return call

    def _output_grad_hook(self, module: nn.Module, call_ref, grad: torch.Tensor) -> None:
        """Tensor hook on one call's output: hand its gradient to ``capture_backprops_hook``."""
        call = call_ref()
        if call is None:
            return  # the call's inputs were dropped (a failed pass, a cleared state)
        capture = self._capture
        capture.firing = call
        try:
            self.capture_backprops_hook(module, None, (grad,), **self._backprops_hook_kwargs)
        finally:
            capture.firing = None

    def _probe_batch_mixing(self, module: nn.Module, activations: list, output) -> None:
        # Registered samplers are exact by construction; only the generic fallback needs proof
        # that the layer treats samples independently (see the class docstring).
        self._probed.add(module)
        if (
            self._samplers.get(module) is not None
            or not self.check_batch_mixing
            or getattr(module, SKIP_BATCH_MIXING_CHECK_ATTR, False)
        ):
            return
        dim = _batch_dim(module, self.batch_first)
        mismatch = batch_mixing_mismatch(module, activations, output, dim)
        if mismatch is None:
            return
        name = self._module_names[module]
        # This forward will not be backpropagated: forget what earlier layers captured in it.
        self._capture.forget()
        raise RuntimeError(
            f"layer '{name}' ({type(module).__name__}) has no grad sampler and its training-mode "
            f"forward mixes samples across the batch (like BatchNorm): {mismatch}. Per-sample "
            "gradients of such a layer are not defined, so DP-SGD's guarantee would not hold. "
            "Replace it with a per-sample layer (e.g. GroupNorm/LayerNorm instead of BatchNorm). "
            "If the layer is per-sample and the check misfired (e.g. randomness in its forward), "
            "register an exact grad sampler with opacus.grad_sample.register_grad_sampler, or set "
            f"{SKIP_BATCH_MIXING_CHECK_ATTR} = True on the layer to skip this check. The check "
            f"read the batch on dim {dim} (batch_first={self.batch_first}): if the batch is "
            "elsewhere, fix the wrapper's batch_first."
        )

    def _check_batch_size(self, module: nn.Module, batch: int) -> None:
        # Later calls of the same layer may see fewer samples (packed sequences); distinct
        # layers must agree with the first one, or the hooks are reading the wrong dimension.
        if module in self._called_this_forward:
            return
        self._called_this_forward.add(module)
        name = self._module_names[module]
        if self._first_layer is None:
            self._first_layer = (name, batch)
            return
        first_name, first_batch = self._first_layer
        if batch != first_batch:
            raise ValueError(
                f"layer '{name}' ({type(module).__name__}) sees batch size {batch} but layer "
                f"'{first_name}' saw {first_batch} in the same forward pass. Every layer must "
                f"see the batch on dim {_batch_dim(module, self.batch_first)} "
                f"(batch_first={self.batch_first}); check the wrapper's batch_first or reshapes "
                "that merge the batch with other dimensions."
            )

    def rearrange_grad_samples(
        self,
        *,
        module: nn.Module,
        backprops: torch.Tensor,
        loss_reduction: str,
        batch_first: bool,
    ) -> Tuple[List, torch.Tensor]:
        """Pop the activations of the layer's latest call; put the batch on dim 0 of both.

        With ``loss_reduction="mean"`` each output gradient is ``1/B`` of the sample's own loss
        gradient, so the backprops are multiplied by ``B``.

        Args:
            module: the layer.
            backprops: the gradient of the loss with respect to its output.
            loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch (per-sample
                gradients are rescaled for ``"mean"``).
            batch_first: True if the batch is dimension 0 of every layer's input and output, False
                for dimension 1.

        Returns:
            ``(activations, backprops)`` with the batch on dim 0.
        """
        activations = self._capture.pop(module)
        if _batch_dim(module, batch_first) != 0:
            activations = [
                a.movedim(1, 0) if torch.is_tensor(a) and a.dim() > 1 else a for a in activations
            ]
            backprops = backprops.movedim(1, 0)
        if loss_reduction == "mean":
            backprops = backprops * self._capture.max_batch_len(module)
        return activations, backprops

    def _per_sample_grads(
        self, module: nn.Module, activations: List, backprops: torch.Tensor
    ) -> Dict[nn.Parameter, torch.Tensor]:
        sampler = self._samplers[module]
        if backprops.shape[0] == 0:
            params = self.hooked_parameters(module)
            return {p: p.new_zeros((0, *p.shape)) for p in params if p.requires_grad}
        if sampler is None:
            return per_sample_gradient(module, activations, backprops, batch_first=self.batch_first)
        return sampler(module, activations, backprops)

    def _take_call(self, module: nn.Module, grad_output, batch_first):
        """Activations and backprops of the call whose output gradient just arrived, or None."""
        # 0: no call pending, or that call's inputs were dropped (a failed pass, a cleared state)
        pending = self._capture.answerable(module) if self.hooks_enabled else 0
        if not pending:
            return None
        backprops = grad_output[0]
        if backprops is None:  # output not differentiated: drop the call
            self._capture.pop(module)
            self._capture.release(module)
            return None
        only_call = self._pass.first_call(module) and pending == 1
        # The "mean" factor is applied by the caller (ReductionScale), where it is cheapest.
        activations, backprops = self.rearrange_grad_samples(
            module=module,
            backprops=backprops,
            loss_reduction="sum",
            batch_first=batch_first,
        )
        max_batch_len = self._capture.release(module)
        self._queue_finish()
        return activations, backprops, max_batch_len, only_call

    def capture_backprops_hook(
        self,
        module: nn.Module,
        _forward_input: torch.Tensor,
        forward_output: torch.Tensor,
        loss_reduction: str,
        batch_first: bool,
    ):
        """Backward hook of one call: its per-sample gradients, summed into the parameters.

        ``forward_output`` is the tuple of output gradients (``(grad,)``), as a full backward
        hook receives it.

        Args:
            module: the layer the hook belongs to.
            _forward_input: unused.
            forward_output: the gradients of the loss with respect to the layer's outputs.
            loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch (per-sample
                gradients are rescaled for ``"mean"``).
            batch_first: True if the batch is dimension 0 of every layer's input and output, False
                for dimension 1.
        """
        call = self._take_call(module, forward_output, batch_first)
        if call is None:
            return
        activations, backprops, max_batch_len, only_call = call
        sampler = self._samplers[module]
        scale = ReductionScale(loss_reduction).factor(max_batch_len)
        if scale is not None:
            if ReductionScale.scale_output_instead(
                backprops, self.hooked_parameters(module), only_call
            ):
                grad_samples = self._per_sample_grads(module, activations, backprops)
                # (Never a 2-D-input Linear, whose gradient outgrows its backprops: no
                # book-keeping here.)
                self._accumulate({p: g * scale for p, g in grad_samples.items()}, max_batch_len)
                return
            if _scale_input_instead(module, sampler, activations, backprops):
                activations = [activations[0] * scale]
            else:
                backprops = backprops * scale
        if (
            not only_call
            and backprops.shape[0] > 0
            and getattr(sampler, SUMS_OVER_SEQUENCE_ATTR, False)
        ):
            self._deferred.defer(module, activations, backprops, max_batch_len)
            return
        grad_samples = self._per_sample_grads(module, activations, backprops)
        norms = None
        if only_call:
            norms = _bookkept_norms(module, sampler, activations, backprops, max_batch_len)
        self._accumulate(grad_samples, max_batch_len, norms)

    def _flush_deferred(self) -> None:
        for module, calls in self._deferred.take():
            max_batch_len = max(c[2] for c in calls)
            activations, backprops = _concat_calls(
                [c[0][0] for c in calls], [c[1] for c in calls], max_batch_len
            )
            self._accumulate(
                self._per_sample_grads(module, [activations], backprops), max_batch_len
            )

    def _accumulate(
        self,
        grad_samples: Dict[nn.Parameter, torch.Tensor],
        max_batch_len: int,
        norms: Optional[Dict[nn.Parameter, tuple]] = None,
    ):
        for p, gs in grad_samples.items():
            first = getattr(p, "_current_grad_sample", None) is None
            create_or_accumulate_grad_sample(param=p, grad_sample=gs, max_batch_len=max_batch_len)
            self._pass.add(p)
            self._norm_book.record(p, None if norms is None else norms.get(p), first)

    # ------------------------------------------------------- end of a backward
    def _queue_finish(self) -> None:
        if not self._pass.finish_queued:
            self._pass.finish_queued = True
            # Runs once the autograd engine has finished this backward pass, i.e. after every
            # contribution of every layer to a shared parameter has arrived.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _drop_pending(self) -> None:
        self._deferred.clear()
        self._norm_book.clear()
        for p in self._pass.take():
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample

    def _finish_backward(self) -> None:
        try:
            self._flush_deferred()
        except Exception:
            self._drop_pending()
            raise
        pending = list(self._pass.params.values())
        if not self._grad_accumulation_allowed and any(
            getattr(p, "grad_sample", None) is not None for p in pending
        ):
            self._drop_pending()
            raise ValueError(
                "Poisson sampling is incompatible with gradient accumulation: this backward pass "
                "would add a second batch of per-sample gradients to p.grad_sample, but each "
                "Poisson batch must be its own step (its size is part of the privacy analysis). "
                "Call optimizer.step() and optimizer.zero_grad() after every backward pass, or "
                "use opacus.utils.batch_memory_manager.BatchMemoryManager to process a large "
                "logical batch in smaller physical ones."
            )
        pending_norms = self._norm_book.take()
        self._pass.reset()
        for p in pending:
            fresh = getattr(p, "grad_sample", None) is None
            promote_current_grad_sample(p)
            norms = pending_norms.get(id(p))
            if fresh and norms is not None:
                gs = p.grad_sample
                setattr(p, GRAD_SAMPLE_NORMS_ATTR, (weakref.ref(gs), gs._version, *norms))
            elif hasattr(p, GRAD_SAMPLE_NORMS_ATTR):
                # grad_sample is now a list of chunks: the cache describes none of them alone
                # as the optimizer reads it (concatenated), so there is none.
                delattr(p, GRAD_SAMPLE_NORMS_ATTR)


class GradSampleModule(GradSampleHooks, AbstractGradSampleModule):
    """Wraps ``m`` so that ``loss.backward()`` also fills ``p.grad_sample`` for trainable params.

    After one backward pass ``p.grad_sample`` has shape ``(batch, *p.shape)``: row ``i`` is the
    gradient of sample ``i``'s own loss.  Each further backward pass before ``zero_grad()`` adds
    its own tensor: ``p.grad_sample`` becomes a list with one tensor per pass (gradient
    accumulation; ``forbid_grad_accumulation()`` refuses it, as ``make_private`` does under
    Poisson sampling).  The wrapped model is ``self._module``; attribute access falls through
    to it.  Wrapping a model that already carries hooks raises ``ValueError``.  See
    ``GradSampleHooks`` for the arguments.

    Args:
        m: the model to wrap.
        batch_first: True if the batch is dimension 0 of every layer's input and output, False for
            dimension 1.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch (per-sample
            gradients are rescaled for ``"mean"``).
        strict: raise if a layer's per-sample gradients cannot be computed (False: such layers are
            left without hooks).
        force_functorch: compute every per-sample gradient with ``torch.func`` instead of the
            layer's grad sampler.
    """

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first=True,
        loss_reduction="mean",
        strict: bool = True,
        force_functorch=False,
    ):
        AbstractGradSampleModule.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction
        )
        GradSampleHooks.__init__(
            self,
            m,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            strict=strict,
            force_functorch=force_functorch,
        )

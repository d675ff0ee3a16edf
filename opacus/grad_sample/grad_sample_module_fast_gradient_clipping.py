"""Per-sample gradient *norms* for fast gradient clipping (ghost clipping).

Clipping only needs each sample's total gradient norm.  Li et al. (2022), "Large language models
can be strong differentially private learners" (ghost clipping), and Bu et al. (2023),
"Differentially private optimization on large model at small cost" (book-keeping), compute it
layer by layer from the activations and output gradients without materialising the
``(batch, *param.shape)`` tensors;
a second backward pass of the loss re-weighted by the clipping coefficients then yields the sum of
clipped gradients in ``p.grad``.  Here a backward pass with hooks enabled stores
``p._norm_sample`` (shape ``(batch,)``) for every trainable parameter: from the layer's norm
sampler where one is registered and the layer is called once, otherwise as the norm of the
materialised per-sample gradient.  A weight shared by an ``nn.Embedding`` and an ``nn.Linear``
head (GPT-2's ``wte`` / ``lm_head``), each called once, gets its exact norm from the two ghost
norms and their cross term (``tied_embedding_linear_cross_term``).

Book-keeping (Bu et al. 2023): when every trainable parameter belongs to a layer called once
whose norm sampler runs and which has a clipped-sum sampler (``nn.Linear``, ``nn.Embedding``,
``nn.LayerNorm``, ``nn.RMSNorm``, ``transformers``' ``Conv1D``; a tied pair adds both sums),
the norm pass keeps each layer's activations and backprops, and ``accumulate_clipped_sum`` forms
``sum_i c_i g_i`` from them directly, so the second backward pass (and its input-gradient
products) is skipped.  ``plan_book_keeping`` decides, after the forward pass, whether that holds.
Keeping the backprops costs memory the two-pass scheme does not need (ghost clipping exists to
save memory), so it is done only while they are no larger than ``max_book_keeping_ratio`` times
the trainable parameters (the size of the gradients themselves) or than
``max_book_keeping_activation_ratio`` (1) times the floating-point layer inputs captured in the
same forward (which the graph holds anyway), or than the other tensors the autograd graph saved
for its backward (which the book-keeping norm pass frees as it goes): layers that widen their
inputs over long sequences with little else in the graph keep the memory-lean second pass.
"""

import functools
import logging
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.autograd.graph import GradientEdge

from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.ghost_loss import ClippedSumHooks
from opacus.grad_sample.grad_sample_module import (
    GradSampleHooks,
    create_or_accumulate_grad_sample,
    hookable_output,
    promote_current_grad_sample,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.module_utils import requires_grad, trainable_modules, trainable_parameters
from opacus.grad_sample.pass_state import ReductionScale
from opacus.grad_sample.registry import CLIPPED_SUM_SAMPLERS, KEEPS_GRADS_ATTR, weighted_sums
from opacus.grad_sample.transformers_layers import tied_embedding_linear_cross_term
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
from opacus.optimizers import clipping

__all__ = [
    "AbstractGradSampleModule",
    "DPGRU",
    "DPLSTM",
    "DPRNN",
    "GradSampleHooks",
    "GradSampleHooksFastGradientClipping",
    "GradSampleModuleFastGradientClipping",
    "create_norm_sample",
    "create_or_accumulate_grad_sample",
    "ft_compute_per_sample_gradient",
    "promote_current_grad_sample",
    "requires_grad",
    "trainable_modules",
    "trainable_parameters",
]

logger = logging.getLogger(__name__)


def create_norm_sample(
    *, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int
) -> None:
    """Store per-sample norms ``grad_sample`` (shape ``(b,)``) as ``param._norm_sample``.

    Rows beyond ``b`` (samples absent from a shorter call) get norm 0. Norms do not add up over
    calls, so this overwrites: layers called several times go through materialised gradients.

    Args:
        param: the parameter.
        grad_sample: per-sample norms ``(b,)``.
        max_batch_len: the batch size of the pass.
    """
    batch = grad_sample.shape[0]
    if batch == max_batch_len:
        param._norm_sample = grad_sample
    else:
        norms = grad_sample.new_zeros((max_batch_len,))
        norms[:batch] = grad_sample
        param._norm_sample = norms


def _row_norms(grad_sample: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample's gradient; ``(batch,)`` gradients are those of scalar params."""
    # float32 for half-precision gradients: their squares overflow (see optimizers.clipping).
    dtype = torch.float32 if grad_sample.dtype in (torch.float16, torch.bfloat16) else None
    if grad_sample.dim() == 1:
        return grad_sample.abs().to(dtype or grad_sample.dtype)
    return torch.linalg.vector_norm(grad_sample.flatten(start_dim=1), 2, dim=1, dtype=dtype)


@functools.lru_cache(maxsize=None)
def tensor_hooks_run_on_captured_gradients() -> bool:
    """Whether this torch runs a non-leaf tensor's hooks when ``torch.autograd.grad`` is asked
    for that tensor's gradient (the anchored norm pass relies on it; checked once)."""
    get_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    if get_edge is None:
        return False
    x = torch.zeros(1, requires_grad=True)
    h = x * 1.0
    fired = []
    h.register_hook(lambda g: fired.append(g))
    torch.autograd.grad((h * 2.0).sum(), [get_edge(h)])
    return bool(fired)


class _OutputTally:
    """Elements and bytes of the hooked calls' outputs in one forward (their backprops are what
    book-keeping keeps); a slotted object, so a call adds to it without ``nn.Module``'s
    attribute machinery."""

    __slots__ = ("numel", "bytes")

    def __init__(self):
        self.numel = 0
        self.bytes = 0

    def add(self, output: torch.Tensor) -> None:
        n = output.numel()
        self.numel += n
        self.bytes += n * output.element_size()


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. a checkpointed segment's
    forward, re-run to recompute its activations)."""
    current_task = getattr(torch._C, "_current_graph_task_id", None)
    return current_task is not None and current_task() != -1


@functools.lru_cache(maxsize=None)
def _saved_tensor_names(node_type: type) -> tuple:
    """The ``_saved_*`` attributes of an autograd node type (what it keeps for backward)."""
    return tuple(name for name in dir(node_type) if name.startswith("_saved_"))


def _shared_params(module: nn.Module) -> set:
    """ids of parameters owned by more than one submodule (tied weights)."""
    seen, shared = set(), set()
    for _, sub in module.named_modules(remove_duplicate=False):
        for p in sub.parameters(recurse=False):
            if id(p) in seen:
                shared.add(id(p))
            seen.add(id(p))
    return shared


class _TiedHalf:
    """One layer of an ``nn.Embedding`` / ``nn.Linear`` pair sharing ``weight`` (GPT-2's
    ``wte`` / ``lm_head``): its partner, the shared parameter, and which side it is."""

    __slots__ = ("partner", "param", "is_embedding")

    def __init__(self, partner: nn.Module, param: nn.Parameter, is_embedding: bool):
        self.partner = partner
        self.param = param
        self.is_embedding = is_embedding


def _tied_embedding_heads(module: nn.Module, shared: set) -> Dict[nn.Module, _TiedHalf]:
    """``{layer: _TiedHalf}`` for every shared parameter owned by exactly one ``nn.Embedding``
    (without ``scale_grad_by_freq``) and one ``nn.Linear``, both as their ``weight``."""
    owners: Dict[int, list] = {}
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if id(p) in shared:
                owners.setdefault(id(p), []).append((sub, name, p))
    tied = {}
    for entries in owners.values():
        if len(entries) != 2 or any(name != "weight" for _, name, _ in entries):
            continue
        (m1, _, p), (m2, _, _) = entries
        kinds = {type(m1), type(m2)}
        if kinds != {nn.Embedding, nn.Linear}:
            continue
        emb, head = (m1, m2) if type(m1) is nn.Embedding else (m2, m1)
        if emb.scale_grad_by_freq or emb.sparse:
            continue
        tied[emb] = _TiedHalf(head, p, True)
        tied[head] = _TiedHalf(emb, p, False)
    return tied


class GradSampleHooksFastGradientClipping(GradSampleHooks, ClippedSumHooks):
    """Hooks that store per-sample gradient norms ``p._norm_sample`` instead of ``p.grad_sample``.

    Every trainable parameter has ``grad_sample = None`` from construction on, and keeps it:
    where a norm comes from a materialised per-sample gradient (``use_ghost_clipping=False``,
    layers without a norm sampler, layers called several times per forward, tied weights other
    than an Embedding / Linear-head pair), that gradient is reduced to its ``(batch,)`` norms
    once the backward pass is complete and ``grad_sample`` is set back to None.  Layers used
    twice (or sharing a parameter) are thus clipped exactly, where Opacus 1.6 refuses them under
    ghost clipping.

    Args:
        m: the model.
        max_grad_norm: clipping bound ``C`` used by ``get_clipping_coef``.
        use_ghost_clipping: use registered norm samplers (ghost norms); if False, every norm is
            taken from materialised per-sample gradients.
        batch_first: True if the batch is dimension 0 of every layer's input and output, False for
            dimension 1.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch (per-sample
            gradients are rescaled for ``"mean"``).
        strict: raise if a layer's per-sample gradients cannot be computed (False: such layers are
            left without hooks).
        force_functorch: compute every per-sample gradient with ``torch.func`` instead of the
            layer's grad sampler.
    """

    # Book-keep while the kept backprops have at most this many elements per trainable parameter
    # element, or at most ``max_book_keeping_activation_ratio`` per element of the layer inputs
    # captured by the forward (module docstring); ``math.inf``: always where possible, 0: never.
    max_book_keeping_ratio = 1.0
    # The autograd graph holds the captured inputs anyway.  Beyond both budgets, book-keeping
    # is still planned while the backprops fit in the other tensors the graph saved (GPT-2:
    # attention products, GELU inputs, the loss's log-softmax), which the norm pass frees
    # (``graph_bytes_beyond_activations``).  A flat factor 2.0 instead would raise an Embedding
    # + ReLU MLP over 1024 tokens (whose graph holds little else) from 1.01x to 1.45x peak.
    max_book_keeping_activation_ratio = 1.0
    # False where the second pass is itself needed (FSDP reduce-scatters in it).
    _can_book_keep = True
    _can_skip_batch_gradients = False
    # Ghost norms for an Embedding and a Linear head sharing their weight (cross term).
    _ghost_tied_pairs = True
    # The model's parameters may be listed once per wrapping (``_model_parameters``); False where
    # the registered parameters are swapped during a step (FSDP's shards).
    _parameters_fixed = True

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first=True,
        loss_reduction="mean",
        strict: bool = True,
        force_functorch=False,
        max_grad_norm=1,
        use_ghost_clipping=True,
    ):
        self.max_grad_norm = max_grad_norm
        self.use_ghost_clipping = use_ghost_clipping
        self._per_sample_gradient_norms: Optional[torch.Tensor] = None
        self._first_pass_anchors: Optional[List[GradientEdge]] = None
        self._anchored_calls = 0
        self._shared = _shared_params(m)
        self._tied = _tied_embedding_heads(m, self._shared) if self._ghost_tied_pairs else {}
        # id(shared weight) -> (layer, activations, backprops, scale, norms, max_batch_len) of
        # the tied half whose output gradient came first in this pass.
        self._tied_waiting: Dict[int, tuple] = {}
        # Book-keeping (module docstring): planned for this norm pass, and what it keeps.
        self._book_keeping = False
        self._book_kept: Dict[nn.Module, tuple] = {}
        self._tally = _OutputTally()  # of the hooked calls of this forward
        self._may_keep_grads = False  # plan_book_keeping: a layer may keep its gradient
        self._embeddings: Optional[List[tuple]] = None  # (name, module), for scale_grad_by_freq
        # Hooked calls of this forward that ran with gradients off, per layer: reentrant
        # checkpointing re-runs them inside the backward pass, where they are captured instead.
        self._calls_to_recompute: Dict[nn.Module, int] = {}
        GradSampleHooks.__init__(
            self,
            m,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            strict=strict,
            force_functorch=force_functorch,
        )
        for module in self._samplers:
            self.log_module_gradient_sample_mode(
                module, force_functorch=force_functorch, use_ghost_clipping=use_ghost_clipping
            )
        # Norms only: per-sample gradients never stay on the parameters (they read None).
        for _, p in trainable_parameters(self._module):
            p.grad_sample = None

    def _norm_sampler(self, module: nn.Module):
        if not self.use_ghost_clipping or self.force_functorch:
            return None
        if module in self._tied:
            return self.NORM_SAMPLERS.get(type(module))  # exact with the cross term
        if self._shared and any(id(p) in self._shared for p in module.parameters()):
            return None  # tied weights: the norm of a sum is not a sum of norms
        return self.NORM_SAMPLERS.get(type(module))

    def log_module_gradient_sample_mode(
        self, module: nn.Module, *, force_functorch=False, use_ghost_clipping=True
    ) -> str:
        """Log (and return) how ``module``'s per-sample norms are obtained.

        Args:
            module: the layer.
            force_functorch: compute every per-sample gradient with ``torch.func`` instead of the
                layer's grad sampler.
            use_ghost_clipping: use the registered norm samplers (ghost norms); False takes every
                norm from materialised per-sample gradients.
        """
        if use_ghost_clipping and not force_functorch and self._norm_sampler(module) is not None:
            mode = "ghost"
        elif force_functorch or self._samplers.get(module) is None:
            mode = "functorch"
        else:
            mode = "grad_sampler"
        logger.debug(
            "%s (%s): per-sample norms via %s",
            self._module_names.get(module, "?"),
            type(module).__name__,
            mode,
        )
        return mode

    def _start_forward(self, module: nn.Module, _inputs) -> None:
        if _in_backward():
            return  # a checkpointed model re-run for its activations: the same forward pass
        # Release the last forward's anchors first: they keep its graph (and its calls) alive.
        self._first_pass_anchors = None
        super()._start_forward(module, _inputs)
        self._first_pass_anchors = [] if torch.is_grad_enabled() else None
        self._anchored_calls = 0
        self._book_keeping = False
        self._book_kept = {}
        self._tally = _OutputTally()
        self._tied_waiting = {}
        self._calls_to_recompute = {}
        if self.hooks_enabled:
            self._per_sample_gradient_norms = None
            # Norms of the previous step must not leak into this one (unused params stay at 0).
            for p in self._model_parameters():
                if hasattr(p, "_norm_sample"):
                    del p._norm_sample

    def capture_activations_hook(
        self,
        module: nn.Module,
        forward_input: List[torch.Tensor],
        _forward_output: torch.Tensor,
    ):
        """Forward hook: keep the layer's detached inputs (as ``GradSampleHooks``).

        Activation checkpointing runs a segment's forward twice.  Without reentrancy the first
        run builds the graph the loss is differentiated through, so the re-run inside the
        backward pass (recomputing saved tensors only) is ignored.  Reentrant checkpointing runs
        the segment with gradients off, then again inside the backward pass, where its own
        backward delivers the output gradients: that re-run is the one captured.

        Args:
            module: the layer the hook belongs to.
            forward_input: the layer's positional inputs.
            _forward_output: the layer's output (unused).
            module: the layer the hook belongs to.
            forward_input: the layer's positional inputs.
            _forward_output: the layer's output (unused).
        """
        if (not torch.is_grad_enabled() or _in_backward()) and not self._recompute_gate(module):
            return
        if self._capture_call(module, forward_input, _forward_output) is None:
            return  # not captured
        if torch.is_tensor(_forward_output):
            self._tally.add(_forward_output)
        if self._first_pass_anchors is not None:
            self._record_anchors(hookable_output(_forward_output))

    def _recompute_gate(self, module: nn.Module) -> bool:
        """For a call with gradients off or inside the backward pass (activation checkpointing):
        False if it must not be captured.  A hooked call with gradients off is counted as one
        to recompute; inside the backward pass, only such counted calls are captured."""
        if not (
            self.hooks_enabled
            and self._training_forward(module)
            and any(p.requires_grad for p in self.hooked_parameters(module))
        ):
            return True  # not a hooked training call: _capture_call decides (it skips it)
        if _in_backward():
            if not self._calls_to_recompute.get(module):
                return False
            self._calls_to_recompute[module] -= 1
            return True
        self._calls_to_recompute[module] = self._calls_to_recompute.get(module, 0) + 1
        return False

    def _record_anchors(self, output: Optional[torch.Tensor]) -> None:
        """Remember the gradient edge of this call's hooked output: asking the norm pass for the
        gradients at those edges runs every output hook without computing any weight gradient
        (``double_backward``).  A call without a hooked output disables the shortcut."""
        if output is None or output.grad_fn is None:
            self._first_pass_anchors = None
            return
        self._first_pass_anchors.append(torch.autograd.graph.get_gradient_edge(output))
        self._anchored_calls += 1

    def measures_every_parameter(self) -> bool:
        """True: a parameter the loss reaches without a norm is refused (``double_backward``)."""
        return True

    def take_unmeasured_calls(self) -> List[nn.Module]:
        """Layers whose calls of the last forward got no norm in the norm pass (their output
        reached the loss but their hook did not fire); their captured inputs are dropped.
        Calls whose output the loss never used are forgotten first: they contribute 0."""
        self._capture.prune_orphans()
        leftover = [m for m, n in self._capture.counts().items() if n]
        self._capture.forget(leftover)
        return leftover

    def first_pass_anchors(self) -> Optional[List[GradientEdge]]:
        """Gradient edges that make every hooked call of the last forward fire its output hook
        (see ``_record_anchors``), or None when the shortcut is unavailable.  Forgets them: they
        serve one norm pass (and must not keep the graph's nodes alive)."""
        anchors, self._first_pass_anchors = self._first_pass_anchors, None
        self._capture.prune_orphans()
        pending = sum(self._capture.counts().values())
        if not anchors or pending != self._anchored_calls:
            return None  # e.g. calls captured by an earlier forward without a backward yet
        if not tensor_hooks_run_on_captured_gradients():
            return None  # an older torch: the norm pass asks for parameter gradients instead
        if self.norm_pass_needs_backward() or self.unhooked_parameters():
            # The pass must show which parameters the loss reached: one that no hook measures
            # would silently count as norm 0 (double_backward refuses it).
            return None
        return anchors

    def unhooked_parameters(self) -> List[nn.Parameter]:
        """Trainable parameters that no installed hook covers (layers left out with
        ``strict=False``): ghost clipping has no per-sample norm for them."""
        hooked = self._per_structure("hooked_ids", self._hooked_ids)
        return [p for p in self._trainable_now() if id(p) not in hooked]

    def _hooked_ids(self) -> set:
        return {id(p) for module in self._samplers for p in self.hooked_parameters(module)}

    # ------------------------------------------------------------ per-model lists
    def _per_structure(self, key: str, build):
        """``build()``, computed once per wrapping and reused while the model keeps the modules
        and parameter objects it was wrapped with.  Every forward pass checks that
        (``ModelStructure``, which raises on any module or parameter added, removed or
        replaced), so the cached value stays exact; where that check is off (hooks removed, or
        ``_parameters_fixed`` False) it is rebuilt at every call.  ``requires_grad`` flags are
        never cached: callers filter on them at use time."""
        structure = self._structure
        if structure is None or not self._parameters_fixed:
            return build()
        cache = self.__dict__.get("_structure_cache")
        if cache is None or cache[0] is not structure:
            cache = (structure, {})
            self._structure_cache = cache
        values = cache[1]
        if key not in values:
            values[key] = build()
        return values[key]

    def _model_parameters(self) -> List[nn.Parameter]:
        """Every parameter of the wrapped model, in ``parameters()`` order (``_per_structure``)."""
        return self._per_structure("parameters", lambda: list(self._module.parameters()))

    def _trainable_now(self) -> List[nn.Parameter]:
        """The wrapped model's parameters that require grad now."""
        return [p for p in self._model_parameters() if p.requires_grad]

    def clipped_parameters(self) -> List[nn.Parameter]:
        """The trainable parameters whose clipped sum the loss leaves in ``p.grad``."""
        return self._trainable_now()

    def hooked_parameters(self, module: nn.Module) -> List[nn.Parameter]:
        """The parameters of ``module``'s subtree (its hook measures them), listed once
        (``_per_structure``)."""
        hooked = self._per_structure("hooked", dict)
        params = hooked.get(module)
        if params is None:
            params = hooked[module] = list(module.parameters())
        return params

    def _own_parameters(self, module: nn.Module) -> List[nn.Parameter]:
        """``module``'s own parameters (``recurse=False``), listed once (``_per_structure``)."""
        own = self._per_structure("own", dict)
        params = own.get(module)
        if params is None:
            params = own[module] = list(module.parameters(recurse=False))
        return params

    def norm_pass_needs_backward(self) -> bool:
        """True if the norm pass must be a real backward pass: hooked layers of the last
        forward ran with gradients off (reentrant activation checkpointing), so their hooks only
        run when the engine re-runs them, which ``torch.autograd.grad`` refuses."""
        return any(self._calls_to_recompute.values())

    def capture_backprops_hook(
        self,
        module: nn.Module,
        _forward_input: torch.Tensor,
        forward_output: torch.Tensor,
        loss_reduction: str,
        batch_first: bool,
    ):
        """Output hook of one call: ghost norms for single-call layers, else materialised grads.

        Args:
            module: the layer the hook belongs to.
            _forward_input: unused.
            forward_output: the gradients of the loss with respect to the layer's outputs.
            loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch (per-sample
                gradients are rescaled for ``"mean"``).
            batch_first: True if the batch is dimension 0 of every layer's input and output, False
                for dimension 1.
            module: the layer the hook belongs to.
            _forward_input: unused.
            forward_output: the gradients of the loss with respect to the layer's outputs.
            loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch (per-sample
                gradients are rescaled for ``"mean"``).
            batch_first: True if the batch is dimension 0 of every layer's input and output, False
                for dimension 1.
        """
        # A per-sample gradient is linear in the backprops, so with "mean" the factor B is
        # applied to the (B,) norms rather than to a copy of the (B, T, d) backprops (memory).
        call = self._take_call(module, forward_output, batch_first)
        if call is None:
            return
        activations, backprops, max_batch_len, only_call = call
        scale = ReductionScale(loss_reduction).factor(max_batch_len)
        norm_sampler = self._norm_sampler(module)
        tied = self._tied.get(module)
        ghost = only_call and norm_sampler is not None and backprops.shape[0] > 0
        if ghost and (tied is None or self._tied_ghost_possible(tied)):
            # Book-keeping may take per-sample gradients the sampler materialised (registry);
            # not where a subclass re-keys the norms (_norms), which the variant would bypass.
            keeping = (
                self._book_keeping
                and type(self)._norms is GradSampleHooksFastGradientClipping._norms
                and getattr(norm_sampler, KEEPS_GRADS_ATTR, None)
            )
            if keeping:
                layer_norms, kept = keeping(module, activations, backprops)
            else:
                layer_norms, kept = self._norms(module, norm_sampler, activations, backprops), None
            for p, norms in layer_norms.items():
                norms = norms if scale is None else norms * scale
                if tied is not None and p is tied.param:
                    half = (activations, backprops) if kept is None else ([kept[p]], None)
                    call = (module, *half, scale, norms, max_batch_len)
                    self._tied_norm(tied, call)
                    continue
                create_norm_sample(param=p, grad_sample=norms, max_batch_len=max_batch_len)
            if self._book_keeping:
                self._book_kept[module] = (
                    (activations, backprops, scale) if kept is None else (kept, None, scale)
                )
            return
        if tied is not None:
            self._materialise_waiting_half(tied)
        if scale is not None:
            backprops = backprops * scale
        self._accumulate(self._per_sample_grads(module, activations, backprops), max_batch_len)

    def _tied_ghost_possible(self, tied: _TiedHalf) -> bool:
        """A tied half's call may take the ghost norm if its partner's call did (it is waiting)
        or still can (its only call of this forward has not reached the pass yet)."""
        if id(tied.param) in self._tied_waiting:
            return True
        partner = tied.partner
        return partner not in self._pass.modules and self._capture.count(partner) == 1

    def _tied_norm(self, tied: _TiedHalf, call: tuple) -> None:
        """Norm of the shared weight: ``||E_i + H_i||^2 = ||E_i||^2 + ||H_i||^2 + 2 <E_i, H_i>``
        once both halves' calls arrived (the first one waits for the second)."""
        waiting = self._tied_waiting.pop(id(tied.param), None)
        if waiting is None:
            self._tied_waiting[id(tied.param)] = call
            self._queue_finish()
            return
        halves = {waiting[0]: waiting, call[0]: call}
        emb = halves[call[0] if tied.is_embedding else tied.partner]
        head = halves[tied.partner if tied.is_embedding else call[0]]
        cross = tied_embedding_linear_cross_term(emb[0], emb[1][0], emb[2], head[1][0], head[2])
        for s in (emb[3], head[3]):
            cross = cross if s is None else cross * s
        squared = emb[4].to(cross.dtype) ** 2 + head[4].to(cross.dtype) ** 2 + 2 * cross
        norms = squared.clamp(min=0).sqrt().to(emb[4].dtype)
        create_norm_sample(param=tied.param, grad_sample=norms, max_batch_len=max(emb[5], head[5]))

    def _materialise_waiting_half(self, tied: _TiedHalf) -> None:
        """This half's call takes the materialised path: so must the waiting half's, or the
        shared weight's norm would miss it."""
        waiting = self._tied_waiting.pop(id(tied.param), None)
        if waiting is None:
            return
        module, activations, backprops, scale, _, max_batch_len = waiting
        self._book_kept.pop(module, None)  # the shared weight is no longer book-kept whole
        if backprops is None:  # its per-sample gradient was kept (capture_backprops_hook)
            grad = activations[0] if scale is None else activations[0] * scale
            self._accumulate({tied.param: grad}, max_batch_len)
            return
        if scale is not None:
            backprops = backprops * scale
        grads = self._per_sample_grads(module, activations, backprops)
        self._accumulate({tied.param: grads[tied.param]}, max_batch_len)

    def _flush_tied_waiting(self) -> None:
        """End of the pass: a half whose partner's output gradient never came (the loss did
        not use it) has the whole norm of the shared weight."""
        waiting, self._tied_waiting = self._tied_waiting, {}
        for call in waiting.values():
            param = self._tied[call[0]].param
            create_norm_sample(param=param, grad_sample=call[4], max_batch_len=call[5])

    def _norms(self, module: nn.Module, norm_sampler, activations, backprops) -> Dict:
        """``norm_sampler``'s ``{param: (B,) norms}`` (subclasses re-key the parameters)."""
        return norm_sampler(module, activations, backprops)

    def plan_book_keeping(self) -> bool:
        """After a forward pass: make the next norm pass keep what ``accumulate_clipped_sum``
        needs, if every trainable parameter qualifies (module docstring); returns whether."""
        self._book_kept = {}
        self._book_keeping = False
        if not self._can_book_keep or not self.hooks_enabled:
            return False
        covered = set()
        self._may_keep_grads = False
        for module, n in self._capture.counts().items():
            sampler = None if n != 1 else self._norm_sampler(module)
            if sampler is None or type(module) not in CLIPPED_SUM_SAMPLERS:
                return False
            covered.update(id(p) for p in self._own_parameters(module) if p.requires_grad)
            if not self._may_keep_grads and getattr(sampler, KEEPS_GRADS_ATTR, None) is not None:
                x = self._capture.first_input(module)
                # One position per sample (a (B, d) input) never keeps its gradient.
                self._may_keep_grads = not torch.is_tensor(x) or x.dim() > 2
        trainable = self._trainable_now()
        self._book_keeping = (
            bool(trainable)
            and covered == {id(p) for p in trainable}
            and self._backprops_fit(trainable)
        )
        return self._book_keeping

    def _backprops_fit(self, trainable: List[nn.Parameter]) -> bool:
        """Whether this forward's backprops may be kept (module docstring): no more than
        ``max_book_keeping_ratio`` times the trainable parameters, or than
        ``max_book_keeping_activation_ratio`` times the captured inputs (held by the graph
        anyway), or than the other tensors the graph saved; always for batch-coupled layers (the
        second pass would be wrong for them, whatever the memory).  Cheapest test first."""
        numel, ratio = self._tally.numel, self.max_book_keeping_ratio
        if numel <= ratio * sum(p.numel() for p in trainable) or self.batch_coupled_layers():
            return True
        if ratio <= 0:
            return False
        if numel <= self.max_book_keeping_activation_ratio * self.captured_activation_numel():
            return True
        return self._tally.bytes <= self.graph_bytes_beyond_activations(enough=self._tally.bytes)

    def may_keep_grads(self) -> bool:
        """True if the planned book-keeping norm pass may keep some layer's per-sample gradient
        in place of its backprops (``registry.KEEPS_GRADS_ATTR``): the pass should then not hold
        every layer's output gradient to its end (``ghost_loss._norm_pass``)."""
        return self._book_keeping and self._may_keep_grads

    def graph_bytes_beyond_activations(self, enough: Optional[int] = None) -> int:
        """Bytes of the tensors the autograd graph of ``norm_pass_root`` (set by
        ``double_backward`` while it plans) saved for its backward, other than the captured
        activations; 0 without a root.  The book-keeping norm pass frees them as it goes, so
        backprops kept up to that size leave the peak below the non-private step's (which holds
        the graph and the activations together).  Saved tensors of custom autograd functions and
        checkpointed segments are not seen (the estimate errs low).  ``enough``: stop walking
        once that many bytes are found (the caller only compares with it); the sum so far is
        returned."""
        root = self.norm_pass_root
        if root is None:
            return 0
        # Captured activations and the parameters stay held whatever the pass frees.
        captured = {key[0] for key in self._captured_activations()}
        captured.update(p.untyped_storage().data_ptr() for p in self._model_parameters())
        held: Dict[int, int] = {}
        total = 0
        seen, stack = set(), [root]
        while stack and (enough is None or total < enough):
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for name in _saved_tensor_names(type(node)):
                try:
                    value = getattr(node, name)
                except Exception:  # already freed, or not readable
                    continue
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    if torch.is_tensor(t):
                        storage = t.untyped_storage()
                        ptr = storage.data_ptr()
                        if ptr not in captured and ptr not in held:
                            held[ptr] = storage.nbytes()
                            total += held[ptr]
            stack.extend(fn for fn, _ in node.next_functions if fn is not None and fn not in seen)
        return total

    def captured_activation_numel(self) -> int:
        """Elements of the floating-point layer inputs captured by this forward (each tensor
        once, however many layers it fed)."""
        return sum(self._captured_activations().values())

    def _captured_activations(self) -> Dict[tuple, int]:
        """``{(storage pointer, offset, shape): numel}`` of the floating-point inputs of the
        pending calls (read when a plan needs them, not at every call)."""
        found = {}
        for call in self._capture.pending_calls():
            for a in call:
                if torch.is_tensor(a) and a.is_floating_point():
                    found[(a.untyped_storage().data_ptr(), a.storage_offset(), a.shape)] = a.numel()
        return found

    def batch_coupled_layers(self) -> List[str]:
        """Trainable layers whose gradient of a batch loss is not the sum of their per-sample
        gradients, so the second backward pass cannot form the clipped sum for them.

        ``scale_grad_by_freq`` divides an embedding row's gradient by the number of times the
        row is looked up, counted over the whole batch by torch's backward but within each
        sample by the per-sample gradient: one sample's presence would change every other
        sample's contribution, which no per-sample clipping bounds.
        """
        if self._embeddings is None:  # the model's structure is fixed once wrapped
            self._embeddings = [
                (name or type(m).__name__, m)
                for name, m in self._module.named_modules()
                if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
            ]
        return [
            name for name, m in self._embeddings if m.scale_grad_by_freq and m.weight.requires_grad
        ]

    def accumulate_clipped_sum(self, coef: torch.Tensor) -> bool:
        """Add ``sum_i coef_i g_i`` to ``p.grad`` of every trainable parameter, from what the
        planned norm pass kept; False (nothing added) when that pass did not keep every layer."""
        kept, self._book_kept = self._book_kept, {}
        planned, self._book_keeping = self._book_keeping, False
        trainable = self._trainable_now()
        covered = {id(p) for m in kept for p in self._own_parameters(m) if p.requires_grad}
        if not planned or covered != {id(p) for p in trainable}:
            return False
        sums = {}
        scaled = {None: coef}  # coef * scale, once per distinct scale
        for module, (activations, backprops, scale) in kept.items():
            weights = scaled.get(scale)
            if weights is None:
                weights = scaled[scale] = coef * scale
            if backprops is None:  # the per-sample gradients themselves were kept
                layer_sums = weighted_sums(activations, weights)
            else:
                layer_sums = CLIPPED_SUM_SAMPLERS[type(module)](
                    module, activations, backprops, weights
                )
            for p, clipped_sum in layer_sums.items():
                # A tied weight gets both layers' sums (its gradient is their sum).
                sums[p] = clipped_sum if p not in sums else sums[p] + clipped_sum
        for p in trainable:
            clipped_sum = sums[p]
            if clipped_sum.dtype != p.dtype:
                clipped_sum = clipped_sum.to(p.dtype)
            if p.grad is None:
                p.grad = clipped_sum
            else:
                p.grad.add_(clipped_sum)
        return True

    def _finish_backward(self) -> None:
        self._flush_tied_waiting()
        pending = self._pass.take()
        for p in pending:
            grad_sample = p._current_grad_sample
            del p._current_grad_sample
            create_norm_sample(
                param=p,
                grad_sample=_row_norms(grad_sample),
                max_batch_len=grad_sample.shape[0],
            )
            p.grad_sample = None  # only the norms are kept

    def _norms_by_param(self) -> Dict[nn.Parameter, torch.Tensor]:
        return {
            p: p._norm_sample
            for p in self._trainable_now()
            if getattr(p, "_norm_sample", None) is not None
        }

    def get_norm_sample(self) -> torch.Tensor:
        """Per-sample norm of the gradient over all trainable parameters, shape ``(batch,)``.

        Parameters without ``_norm_sample`` were not used by the last forward pass and contribute 0.

        Returns:
            the per-sample gradient norms, shape ``(batch,)``.

        Raises:
            ValueError: no norms were computed (no backward pass since the last reset).
        """
        norms = list(self._norms_by_param().values())
        if not norms:
            raise ValueError(
                "no per-sample gradient norms: run loss.backward() with hooks enabled "
                "(enable_hooks()) after a forward pass in training mode first"
            )
        total = clipping.stack_norms(norms)
        self._per_sample_gradient_norms = total
        return total

    def get_clipping_coef(self) -> torch.Tensor:
        """Per-sample clipping coefficients ``min(1, C / (norm + 1e-6))``, shape ``(batch,)``.

        Returns:
            the coefficients, shape ``(batch,)``.
        """
        return clipping.clip_factors(self.get_norm_sample(), self.max_grad_norm)

    @property
    def per_sample_gradient_norms(self) -> torch.Tensor:
        """Per-sample total gradient norms of the last backward pass (``get_norm_sample``)."""
        if self._per_sample_gradient_norms is None:
            return self.get_norm_sample()
        return self._per_sample_gradient_norms


class GradSampleModuleFastGradientClipping(
    GradSampleHooksFastGradientClipping, AbstractGradSampleModule
):
    """``nn.Module`` wrapper storing per-sample gradient norms for fast gradient clipping.

    See ``GradSampleHooksFastGradientClipping`` for the arguments.

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
        max_grad_norm: the clipping bound ``C`` used by ``get_clipping_coef``.
        use_ghost_clipping: use the registered norm samplers (ghost norms); False takes every norm
            from materialised per-sample gradients.
    """

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first=True,
        loss_reduction="mean",
        strict: bool = True,
        force_functorch=False,
        max_grad_norm=1,
        use_ghost_clipping=True,
    ):
        AbstractGradSampleModule.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction
        )
        GradSampleHooksFastGradientClipping.__init__(
            self,
            m,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            strict=strict,
            force_functorch=force_functorch,
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=use_ghost_clipping,
        )

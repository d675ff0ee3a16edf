"""``DPOptimizer``: DP-SGD around any ``torch.optim.Optimizer`` (Abadi et al. 2016, Algorithm 1).

One step is ``clip`` (optimizers/clipping) -> ``sum`` (accumulated in ``p.summed_grad`` across
virtual steps) -> ``noise`` (optimizers/noise) -> ``scale`` -> the wrapped optimizer's ``step`` ->
the step hook (the accountant).  Each stage is a method so that the variants (per-layer, adaptive,
distributed, fast gradient clipping) override only the stage that differs.

Release once (optimizers/consumed): the clip stage marks every per-sample tensor it consumed and
the noise stage the ``summed_grad`` it released; a stage that meets a marked tensor raises, so no
batch is released twice, whichever way (a second ``step()``, a forgotten ``zero_grad()``,
``model.zero_grad()``) the old tensors were left behind.

Every per-step loop reads ``self.params`` once and walks it: the cost of a step is linear in the
number of parameter tensors.
"""

import math
import numbers
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.optim import Optimizer

from opacus.optimizers import clipping
from opacus.optimizers.consumed import check_fresh, mark_consumed
from opacus.optimizers.noise import gaussian_noise, with_gaussian_noise
from opacus.optimizers.utils import params

# Set by the hooks (opacus.grad_sample.grad_sample_module) for parameters whose per-sample norms
# they could compute exactly and cheaply (book-keeping, Bu et al. 2023): ``(weakref to the
# grad_sample tensor, its _version then, norms of shape (batch,), clipped_sum)`` where
# ``clipped_sum`` is None or ``factors -> sum_i factors[i] * grad_sample[i]`` (or None where its
# inputs changed since the backward pass: then the dense sum is taken; see
# ``opacus.optimizers.clipping.Bookkeeping``).  A weak reference,
# so the cache neither keeps a dropped grad_sample alive nor blocks the reuse of its buffer.
GRAD_SAMPLE_NORMS_ATTR = "_grad_sample_norms"


def cached_grad_sample_norms(p: torch.Tensor, grad_sample: torch.Tensor) -> Optional[tuple]:
    """``(norms, factors)`` cached for ``p``, only if they describe ``grad_sample`` as it is now.

    Any change since the hooks computed them invalidates the cache: another tensor in
    ``p.grad_sample`` (accumulation, a user assignment, a list of chunks) or an in-place write
    (the version counter moved). A stale norm would under-clip, i.e. break the privacy guarantee.
    """
    cache = getattr(p, GRAD_SAMPLE_NORMS_ATTR, None)
    if cache is None:
        return None
    ref, version, norms, factors = cache
    current = getattr(p, "grad_sample", None)
    if (
        current is None
        or ref() is not current
        or grad_sample is not current
        or current._version != version
        or norms.shape != current.shape[:1]
    ):
        return None
    return norms, factors


def clear_grad_sample_norms(p: torch.Tensor) -> None:
    """Drop ``p``'s cached per-sample norms."""
    if hasattr(p, GRAD_SAMPLE_NORMS_ATTR):
        delattr(p, GRAD_SAMPLE_NORMS_ATTR)


def _real_scalar(value, name: str, owner: str) -> float:
    """``value`` as a finite float: a 0-d tensor is converted, anything else non-numeric refused.

    A tensor kept as ``noise_multiplier`` would reach the accountant (which expects a float), and
    an infinite or NaN value would turn the model into NaN at the first step.
    """
    if torch.is_tensor(value):
        if value.dim() != 0 or value.is_complex():
            raise TypeError(
                f"{owner}: {name} must be a real number or a 0-d tensor, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}; pass a float"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return value


def _validate_common(
    noise_multiplier, expected_batch_size, loss_reduction, owner: str = "DPOptimizer"
) -> float:
    """Check the settings every DP optimizer shares; return ``noise_multiplier`` as a float."""
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(
            f"{owner}: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}: it must "
            "match the reduction of the loss (and of GradSampleModule)"
        )
    if loss_reduction == "mean" and expected_batch_size is None:
        raise ValueError(
            f"{owner}: expected_batch_size is required when loss_reduction='mean': the noisy "
            "clipped sum is divided by the *expected* batch size (the actual one is private under "
            "Poisson sampling); pass expected_batch_size=sample_rate * dataset_size"
        )
    if expected_batch_size is not None and expected_batch_size <= 0:
        raise ValueError(
            f"{owner}: expected_batch_size must be positive, got {expected_batch_size}"
        )
    noise_multiplier = _real_scalar(noise_multiplier, "noise_multiplier", owner)
    if noise_multiplier < 0:
        raise ValueError(f"{owner}: noise_multiplier must be >= 0, got {noise_multiplier}")
    return noise_multiplier


def _validate_max_grad_norm(max_grad_norm, owner: str = "DPOptimizer") -> float:
    """One positive, finite clip bound as a float (a list is per-layer clipping's business)."""
    if isinstance(max_grad_norm, (list, tuple)):
        raise TypeError(
            f"{owner} takes one max_grad_norm (a float); for one bound per parameter use "
            "DPPerLayerOptimizer (clipping='per_layer')"
        )
    max_grad_norm = _real_scalar(max_grad_norm, "max_grad_norm", owner)
    if not max_grad_norm > 0:
        raise ValueError(f"{owner}: max_grad_norm must be > 0, got {max_grad_norm}")
    return max_grad_norm


def _missing_grad_sample_message(owner: str, p: torch.Tensor, index: int) -> str:
    where = f"{owner}: parameter {index} (shape {tuple(p.shape)}) requires grad but"
    if not hasattr(p, "grad_sample"):
        return (
            f"{where} has no grad_sample attribute at all: are you using GradSampleModule? Wrap "
            "the model in opacus.GradSampleModule (or use PrivacyEngine.make_private) and run "
            "forward and backward before step(). If it is wrapped, the model ran in eval mode, "
            "where the hooks record nothing: call model.train() before the forward pass."
        )
    if p.grad is not None:
        return (
            f"{where} p.grad_sample is None although backward ran (p.grad is set): the model was "
            "probably in eval mode (model.eval()), where the hooks record no per-sample "
            "gradients; call model.train() before the forward pass. Parameters that the forward "
            "pass does not use must be frozen (requires_grad=False)."
        )
    return (
        f"{where} has no per-sample gradient (p.grad_sample is None): run forward and backward "
        "(with the model in training mode: model.train()) before step(), and set "
        "requires_grad=False on parameters the forward pass does not use."
    )


def _chunk_list(gs) -> List[torch.Tensor]:
    """The per-pass chunks of ``p.grad_sample``: ``[tensor]`` or the list itself."""
    return list(gs) if isinstance(gs, (list, tuple)) else [gs]


def _concat(chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    return chunks[0] if len(chunks) == 1 else torch.cat(list(chunks), dim=0)


class DPOptimizer(Optimizer):
    """Wraps ``optimizer`` so that ``step()`` applies DP-SGD to the per-sample gradients.

    Before ``step()``, every trainable parameter must carry ``p.grad_sample`` of shape
    ``(batch, *p.shape)``, or a list of such tensors, one per backward pass since the last
    ``zero_grad()`` (``GradSampleModule`` sets it during ``backward``).  ``step()`` clips each
    sample's gradient to L2 norm ``max_grad_norm``, sums, adds ``N(0, (noise_multiplier *
    max_grad_norm)^2)`` to every coordinate, divides by ``expected_batch_size *
    accumulated_iterations`` (for ``loss_reduction="mean"``) and calls the wrapped optimizer.
    ``param_groups``, ``state`` and ``defaults`` are those of the wrapped optimizer (shared, not
    copied).

    Virtual steps: ``signal_skip_step()`` makes the next ``step()`` only accumulate the clipped
    sum; the following real step noises the sum over all accumulated physical batches once.

    Release once: call ``optimizer.zero_grad()`` after every step. Per-sample gradients that a
    step already clipped, and a clipped sum that a step already released, make the next step
    raise ``ValueError`` instead of being used again (module docstring).

    Args:
        optimizer: the optimizer to wrap; its ``step`` runs on the private (clipped and noised)
            gradients.
        noise_multiplier: sigma: the noise standard deviation divided by ``max_grad_norm``.
        max_grad_norm: the L2 norm each per-sample gradient is clipped to.
        expected_batch_size: the expected number of examples per logical batch (``sample_rate *
            len(dataset)``); the noised sum is divided by it when ``loss_reduction="mean"``. May be
            None only with ``loss_reduction="sum"``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the examples of a batch.
        generator: a ``torch.Generator`` for the noise (reproducible runs); None uses torch's
            default.
        secure_mode: draw the noise from a cryptographically secure source (no ``generator`` then).

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: an argument is out of range, or ``generator`` is given with ``secure_mode``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: Optional[int],
        loss_reduction: str = "mean",
        generator=None,
        secure_mode: bool = False,
        **kwargs,
    ):
        owner = type(self).__name__
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{owner} wraps a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        noise_multiplier = _validate_common(
            noise_multiplier, expected_batch_size, loss_reduction, owner
        )
        max_grad_norm = _validate_max_grad_norm(max_grad_norm, owner)
        if secure_mode and generator is not None:
            raise ValueError(
                f"{owner}: secure_mode=True draws noise from the OS CSPRNG; do not pass "
                "`generator` as well"
            )
        # Optimizer.__init__ would build new param groups; ours are the wrapped optimizer's.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self.original_optimizer = optimizer
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self.generator = generator
        self.secure_mode = secure_mode
        self.step_hook: Optional[Callable[["DPOptimizer"], None]] = None
        self._step_skip_queue: List[bool] = []
        self._is_last_step_skipped = False
        for p in self.params:
            p.summed_grad = None
        # Not Optimizer._patch_step_function(): it stores a wrapped ``step`` on the concrete
        # class, which then shadows overrides further down the MRO of the multiple-inheritance
        # optimizers (SimpleDistributedPerLayerOptimizer would lose its all-reduce).

    # ------------------------------------------------------------------ shared optimizer state
    @property
    def param_groups(self) -> List[dict]:
        """The wrapped optimizer's param groups (the same list object)."""
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, param_groups: List[dict]):
        self.original_optimizer.param_groups = param_groups

    @property
    def state(self):
        """The wrapped optimizer's per-parameter state."""
        return self.original_optimizer.state

    @state.setter
    def state(self, state):
        self.original_optimizer.state = state

    @property
    def defaults(self) -> dict:
        """The wrapped optimizer's defaults."""
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict):
        self.original_optimizer.defaults = defaults

    @property
    def params(self) -> List[nn.Parameter]:
        """Trainable parameters of all param groups, in order (a new list: read it once)."""
        return params(self)

    # ------------------------------------------------------------------ per-sample inputs
    @staticmethod
    def _grad_sample_of(p: torch.Tensor, index: int) -> torch.Tensor:
        """``p.grad_sample`` as one tensor (a list of per-pass chunks concatenated on dim 0)."""
        return _concat(DPOptimizer._chunks_of(p, index))

    @staticmethod
    def _chunks_of(p: torch.Tensor, index: int, owner: str = "DPOptimizer") -> List[torch.Tensor]:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise ValueError(_missing_grad_sample_message(owner, p, index))
        chunks = _chunk_list(gs)
        if len(chunks) == 0:
            raise ValueError(f"{owner}: parameter {index}: p.grad_sample is an empty list")
        return chunks

    def _fresh_chunks(self, params: Sequence[torch.Tensor]) -> List[List[torch.Tensor]]:
        """Every param's per-pass chunks, refusing any that an earlier step already consumed."""
        owner = type(self).__name__
        chunks = [self._chunks_of(p, i, owner) for i, p in enumerate(params)]
        for c in chunks:
            check_fresh(c, owner=owner, what="p.grad_sample")
        return chunks

    @property
    def grad_samples(self) -> List[torch.Tensor]:
        """``p.grad_sample`` of every trainable param (lists of chunks concatenated on dim 0)."""
        return [self._grad_sample_of(p, i) for i, p in enumerate(self.params)]

    def _bookkeeping(
        self, grad_samples: List[torch.Tensor], params: Optional[Sequence[torch.Tensor]] = None
    ) -> List[Optional[tuple]]:
        """``(norms, factors)`` the hooks cached for exactly these ``grad_samples`` (else None)."""
        params = self.params if params is None else params
        return [cached_grad_sample_norms(p, g) for p, g in zip(params, grad_samples)]

    @property
    def accumulated_iterations(self) -> int:
        """Number of backward passes held in ``grad_sample``: 1 for a tensor, else the list length.

        ``ValueError`` if parameters disagree or one has no ``grad_sample`` attribute at all.
        """
        owner = type(self).__name__
        counts = set()
        for i, p in enumerate(self.params):
            if not hasattr(p, "grad_sample"):
                raise ValueError(_missing_grad_sample_message(owner, p, i))
            gs = p.grad_sample
            if gs is not None:
                counts.add(len(gs) if isinstance(gs, (list, tuple)) else 1)
        if len(counts) > 1:
            raise ValueError(
                f"{owner}: parameters hold different numbers of per-sample gradient chunks "
                f"({sorted(counts)}), i.e. took part in different numbers of backward passes: "
                "call optimizer.zero_grad() after every step and freeze unused parameters"
            )
        return counts.pop() if counts else 1

    # ------------------------------------------------------------------ the DP-SGD stages
    def _check_sums_unreleased(self, params: Sequence[torch.Tensor]) -> None:
        """Refuse to add into a ``summed_grad`` that a step already released (noised): after a
        real step only ``optimizer.zero_grad()`` starts a new sum."""
        owner = type(self).__name__
        for p in params:
            check_fresh(getattr(p, "summed_grad", None), owner=owner, what="p.summed_grad")

    def _accumulate(self, params: Sequence[torch.Tensor], sums: Sequence[torch.Tensor]) -> None:
        """Add this batch's clipped sums into ``summed_grad`` (refusing a released one)."""
        self._check_sums_unreleased(params)
        for p, s in zip(params, sums):
            if getattr(p, "summed_grad", None) is None:
                p.summed_grad = s
            else:
                p.summed_grad.add_(s)

    def _clipped_sums(
        self, grad_samples: List[torch.Tensor], params: Sequence[torch.Tensor]
    ) -> List[torch.Tensor]:
        """This optimizer's clipping rule: one clipped sum per parameter."""
        return clipping.flat_clipped_sums(
            grad_samples, self.max_grad_norm, self._bookkeeping(grad_samples, params)
        )

    def clip_and_accumulate(self):
        """Clip each sample's whole gradient to ``max_grad_norm``; add the sum to summed_grad.

        The per-sample chunks used are marked consumed: a later step refuses them.
        """
        params = self.params
        chunks = self._fresh_chunks(params)
        self._check_sums_unreleased(params)
        grad_samples = [_concat(c) for c in chunks]
        self._accumulate(params, self._clipped_sums(grad_samples, params))
        for c in chunks:
            mark_consumed(c)

    def _summed_grad_of(self, p: torch.Tensor, index: int) -> torch.Tensor:
        s = getattr(p, "summed_grad", None)
        if s is None:
            raise ValueError(
                f"{type(self).__name__}: parameter {index} has no summed_grad: call "
                "clip_and_accumulate() (or step()) after backward, before add_noise()"
            )
        return s

    def _fresh_summed_grads(self, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Every param's ``summed_grad``, refusing one that an earlier step already released."""
        owner = type(self).__name__
        sums = [self._summed_grad_of(p, i) for i, p in enumerate(params)]
        for s in sums:
            check_fresh(s, owner=owner, what="p.summed_grad")
        return sums

    def _noise_std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm

    def add_noise(self):
        """``p.grad = summed_grad + N(0, (noise_multiplier * max_grad_norm)^2)``; the released
        ``summed_grad`` is marked so that no later step releases it again."""
        self._add_noise_and_divide(None)

    def _add_noise_and_divide(self, denominator: Optional[float]) -> None:
        """``add_noise``, each noisy gradient then divided by ``denominator`` (None: not
        divided): ``scale_grad``'s ``p.grad /= denominator`` fused into the noising pass (drawn
        as ``N(0, (std / d)^2) + summed_grad / d``; bit for bit the unfused result when ``d`` is
        a power of two, within about an ulp otherwise)."""
        params = self.params
        sums = self._fresh_summed_grads(params)
        # ``noise_mechanism`` (optional, e.g. optimizers/correlated_noise): draws the noise instead.
        mechanism = getattr(self, "noise_mechanism", None)
        noised = with_gaussian_noise if mechanism is None else mechanism.with_noise
        # The fresh noisy tensors become the gradients: one allocation and pass per param.
        kwargs = dict(generator=self.generator, secure_mode=self.secure_mode)
        if mechanism is None and denominator is not None:
            # Divided as drawn (with_gaussian_noise's ``divisor``): one pass fewer.
            kwargs["divisor"], denominator = denominator, None
        for i, noisy in noised(self._noise_std(), sums, **kwargs):
            if denominator is not None:
                noisy = noisy.div_(denominator)
            p = params[i]
            p.grad = noisy if noisy.shape == p.shape else noisy.view_as(p)
        for s in sums:
            mark_consumed(s)

    def _noise_and_scale(self) -> None:
        """``add_noise()`` then ``scale_grad()``: fused into one pass over the parameters where
        neither stage is overridden (a subclass's own stages run as they are)."""
        cls = type(self)
        if (
            cls.add_noise not in _PLAIN_ADD_NOISE
            or cls.scale_grad is not DPOptimizer.scale_grad
            or getattr(self, "noise_mechanism", None) is not None
        ):
            self.add_noise()
            self.scale_grad()
            return
        mean = self.loss_reduction == "mean"
        self._add_noise_and_divide(self._scale_denominator() if mean else None)

    def _scale_denominator(self) -> float:
        return self.expected_batch_size * self.accumulated_iterations

    def scale_grad(self):
        """For ``loss_reduction="mean"``: divide ``p.grad`` by ``expected_batch_size *
        accumulated_iterations`` (the expected number of samples in the released sum)."""
        if self.loss_reduction == "mean":
            denominator = self._scale_denominator()
            for p in self.params:
                p.grad /= denominator

    def signal_skip_step(self, do_skip=True):
        """Queue whether the next ``step()`` is virtual (accumulate only, no noise, no update).

        Args:
            do_skip: True: the next ``step()`` only accumulates; False: it is a real step.
        """
        self._step_skip_queue.append(do_skip)

    @property
    def last_step_skipped(self) -> bool:
        """True if the last ``step()`` was virtual (``signal_skip_step``): it kept the sum."""
        return self._is_last_step_skipped

    def next_step_skipped(self) -> bool:
        """True if the next ``step()`` will be virtual (``signal_skip_step(True)`` queued)."""
        return self._check_skip_next_step(pop_next=False)

    def _check_skip_next_step(self, pop_next: bool = True) -> bool:
        if self._step_skip_queue:
            return self._step_skip_queue.pop(0) if pop_next else self._step_skip_queue[0]
        return False

    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]):
        """``fn(self)`` runs after every real (not skipped) step's noise: the accountant hook.

        Args:
            fn: called with the optimizer after every real step (the accountant's hook).
        """
        self.step_hook = fn

    def _finish_real_step(self) -> bool:
        if self.step_hook is not None:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Clip and accumulate; unless this step is skipped, noise and scale ``p.grad``.

        Returns ``True`` when the wrapped optimizer should step, ``False`` for a virtual step.

        Args:
            closure: unused; accepted for the ``Optimizer.step`` interface.

        Returns:
            True if the wrapped optimizer should step, False for a virtual (skipped) step.
        """
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self._noise_and_scale()
        return self._finish_real_step()

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One DP-SGD step (``closure``, if given, recomputes the loss and per-sample gradients).

        Args:
            closure: recomputes the loss (run with gradients enabled), as in ``Optimizer.step``.

        Returns:
            the closure's loss (or the wrapped step's result); None for a virtual step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_step():
            result = self.original_optimizer.step()
            return loss if result is None else result
        return None

    def zero_grad(self, set_to_none: bool = False):
        """Clear ``grad_sample`` (always) and ``summed_grad`` (unless the last step was skipped);
        ``p.grad`` as the wrapped optimizer does (``set_to_none`` applies to ``p.grad`` only).

        Args:
            set_to_none: set ``p.grad`` to None instead of zeroing it.
        """
        keep_sum = self._is_last_step_skipped
        for p in self.params:
            p.grad_sample = None
            clear_grad_sample_norms(p)
            if not keep_sum:
                p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none)

    # ------------------------------------------------------------------ checkpoints
    # Opacus 1.6: a checkpoint holds the wrapped optimizer's state only. DP settings are the
    # caller's (they come from make_private's arguments); the accountant records the noise
    # actually used at every step, whatever the optimizer holds.
    _LEGACY_DP_STATE_KEY = "dp_optimizer"

    def state_dict(self):
        """Exactly the wrapped optimizer's state dict (no DP settings)."""
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        """Load ``state_dict`` into the wrapped optimizer only; DP settings stay as they are.

        A checkpoint written by an earlier version of this package (with a ``"dp_optimizer"``
        entry) loads too: that entry is ignored.

        Args:
            state_dict: a state dict of the wrapped optimizer (as ``state_dict`` returns).
        """
        if self._LEGACY_DP_STATE_KEY in state_dict:
            state_dict = {k: v for k, v in state_dict.items() if k != self._LEGACY_DP_STATE_KEY}
        self.original_optimizer.load_state_dict(state_dict)

    def __getstate__(self):
        # torch.optim.Optimizer pickles only defaults/state/param_groups; ours live in the
        # wrapped optimizer, so keep the whole instance dict (copy.deepcopy, pickle).
        return self.__dict__.copy()

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self):
        return (
            f"{type(self).__name__}(noise_multiplier={self.noise_multiplier}, "
            f"max_grad_norm={self.max_grad_norm}, expected_batch_size="
            f"{self.expected_batch_size}, loss_reduction={self.loss_reduction!r}, "
            f"wrapping {self.original_optimizer!r})"
        )


# ``add_noise`` implementations that ``_noise_and_scale`` may fuse with ``scale_grad``: the plain
# stage (subclasses that only re-document it register theirs here).
_PLAIN_ADD_NOISE = {DPOptimizer.add_noise}


def _generate_noise(
    std: float,
    reference: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    secure_mode: bool = False,
) -> torch.Tensor:
    """Gaussian noise of std ``std`` shaped, typed and placed like ``reference`` (Opacus 1.6).

    ``std == 0``: zeros, the generator untouched. Otherwise one draw with ``generator``; in
    secure mode one discarded scalar draw, then the sum of four draws divided by 2, from the OS
    CSPRNG (``opacus.optimizers.noise``).
    """
    return gaussian_noise(std, reference, generator=generator, secure_mode=secure_mode)

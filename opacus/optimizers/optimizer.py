"""``DPOptimizer``: DP-SGD around any ``torch.optim.Optimizer`` (Abadi et al. 2016, Algorithm 1).

One step is ``clip`` (optimizers/clipping) -> ``sum`` (accumulated in ``p.summed_grad`` across
virtual steps) -> ``noise`` (optimizers/noise) -> ``scale`` -> the wrapped optimizer's ``step`` ->
the step hook (the accountant).  Each stage is a method so that the variants (per-layer, adaptive,
distributed, fast gradient clipping) override only the stage that differs.
"""

from collections import OrderedDict
from typing import Callable, List, Optional

import torch
import torch.nn as nn
from torch.optim import Optimizer

from opacus.optimizers import clipping
from opacus.optimizers.noise import with_gaussian_noise
from opacus.optimizers.utils import params

# Set by the hooks (opacus.grad_sample.grad_sample_module) for parameters whose per-sample norms
# they could compute exactly and cheaply (book-keeping, Bu et al. 2023): ``(weakref to the
# grad_sample tensor, its _version then, norms of shape (batch,), factors)`` where
# ``factors`` is None or ``(a, b)`` with ``grad_sample[i] == outer(b[i], a[i])``.  A weak reference,
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


def _validate_common(noise_multiplier, expected_batch_size, loss_reduction) -> None:
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(
            f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}: it must match the "
            "reduction of the loss (and of GradSampleModule)"
        )
    if loss_reduction == "mean" and expected_batch_size is None:
        raise ValueError(
            "expected_batch_size is required when loss_reduction='mean': the noisy clipped sum "
            "is divided by the *expected* batch size (the actual one is private under Poisson "
            "sampling); pass expected_batch_size=sample_rate * dataset_size"
        )
    if expected_batch_size is not None and expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")


def _validate_max_grad_norm(max_grad_norm) -> None:
    if isinstance(max_grad_norm, (list, tuple)):
        raise TypeError(
            "DPOptimizer takes one max_grad_norm (a float); for one bound per parameter use "
            "DPPerLayerOptimizer (clipping='per_layer')"
        )
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")


class DPOptimizer(Optimizer):
    """Wraps ``optimizer`` so that ``step()`` applies DP-SGD to the per-sample gradients.

    Before ``step()``, every trainable parameter must carry ``p.grad_sample`` of shape
    ``(batch, *p.shape)`` (``GradSampleModule`` sets it during ``backward``).  ``step()`` clips
    each sample's gradient to L2 norm ``max_grad_norm``, sums, adds ``N(0, (noise_multiplier *
    max_grad_norm)^2)`` to every coordinate, divides by ``expected_batch_size`` (for
    ``loss_reduction="mean"``) and calls the wrapped optimizer.  ``param_groups``, ``state`` and
    ``defaults`` are those of the wrapped optimizer (shared, not copied).

    Virtual steps: ``signal_skip_step()`` makes the next ``step()`` only accumulate the clipped
    sum; the following real step noises the sum over all accumulated physical batches once.
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
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"DPOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        _validate_common(noise_multiplier, expected_batch_size, loss_reduction)
        _validate_max_grad_norm(max_grad_norm)
        if secure_mode and generator is not None:
            raise ValueError(
                "secure_mode=True draws noise from a CSPRNG-seeded generator; do not pass "
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
        """Trainable parameters of all param groups, in order."""
        return params(self)

    # ------------------------------------------------------------------ per-sample inputs
    @staticmethod
    def _grad_sample_of(p: torch.Tensor, index: int) -> torch.Tensor:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise ValueError(
                f"parameter {index} (shape {tuple(p.shape)}) requires grad but has no per-sample "
                "gradient (p.grad_sample is None). Wrap the model in opacus.GradSampleModule (or "
                "use PrivacyEngine.make_private) and run forward and backward before step(); "
                "set requires_grad=False on parameters the forward pass does not use."
            )
        if isinstance(gs, (list, tuple)):
            if len(gs) == 0:
                raise ValueError(f"parameter {index}: p.grad_sample is an empty list")
            return torch.cat(list(gs), dim=0)
        return gs

    @property
    def grad_samples(self) -> List[torch.Tensor]:
        """``p.grad_sample`` of every trainable param (lists of chunks concatenated on dim 0)."""
        return [self._grad_sample_of(p, i) for i, p in enumerate(self.params)]

    def _bookkeeping(self, grad_samples: List[torch.Tensor]) -> List[Optional[tuple]]:
        """``(norms, factors)`` the hooks cached for exactly these ``grad_samples`` (else None)."""
        return [cached_grad_sample_norms(p, g) for p, g in zip(self.params, grad_samples)]

    @property
    def accumulated_iterations(self) -> int:
        """Number of batches held in ``grad_sample`` (chunks of a list; 1 for a tensor)."""
        counts = set()
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if gs is not None:
                counts.add(len(gs) if isinstance(gs, (list, tuple)) else 1)
        if len(counts) > 1:
            raise ValueError(
                "parameters hold different numbers of accumulated per-sample gradient chunks "
                f"({sorted(counts)}): call zero_grad() after every step"
            )
        return counts.pop() if counts else 1

    # ------------------------------------------------------------------ the DP-SGD stages
    def _accumulate(self, sums: List[torch.Tensor]) -> None:
        for p, s in zip(self.params, sums):
            if getattr(p, "summed_grad", None) is None:
                p.summed_grad = s
            else:
                p.summed_grad.add_(s)

    def clip_and_accumulate(self):
        """Clip each sample's whole gradient to ``max_grad_norm``; add the sum to summed_grad."""
        grad_samples = self.grad_samples
        self._accumulate(
            clipping.flat_clipped_sums(
                grad_samples, self.max_grad_norm, self._bookkeeping(grad_samples)
            )
        )

    def _summed_grad_of(self, p: torch.Tensor, index: int) -> torch.Tensor:
        s = getattr(p, "summed_grad", None)
        if s is None:
            raise ValueError(
                f"parameter {index} has no summed_grad: call clip_and_accumulate() (or step()) "
                "after backward, before add_noise()"
            )
        return s

    def _noise_std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm

    def add_noise(self):
        """``p.grad = summed_grad + N(0, (noise_multiplier * max_grad_norm)^2)``."""
        sums = [self._summed_grad_of(p, i) for i, p in enumerate(self.params)]
        # The fresh noisy tensors become the gradients: one allocation and pass per param.
        for i, noisy in with_gaussian_noise(
            self._noise_std(), sums, generator=self.generator, secure_mode=self.secure_mode
        ):
            self.params[i].grad = noisy.view_as(self.params[i])

    def _scale_denominator(self) -> float:
        return self.expected_batch_size * self.accumulated_iterations

    def scale_grad(self):
        """For ``loss_reduction="mean"``: divide ``p.grad`` by the expected (logical) batch size."""
        if self.loss_reduction == "mean":
            denominator = self._scale_denominator()
            for p in self.params:
                p.grad /= denominator

    def signal_skip_step(self, do_skip=True):
        """Queue whether the next ``step()`` is virtual (accumulate only, no noise, no update)."""
        self._step_skip_queue.append(do_skip)

    def _check_skip_next_step(self, pop_next: bool = True) -> bool:
        if self._step_skip_queue:
            return self._step_skip_queue.pop(0) if pop_next else self._step_skip_queue[0]
        return False

    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]):
        """``fn(self)`` runs after every real (not skipped) step's noise: the accountant hook."""
        self.step_hook = fn

    def _finish_real_step(self) -> bool:
        if self.step_hook is not None:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Clip and accumulate; unless this step is skipped, noise and scale ``p.grad``.

        Returns ``True`` when the wrapped optimizer should step, ``False`` for a virtual step.
        """
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        return self._finish_real_step()

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One DP-SGD step (``closure``, if given, recomputes the loss and per-sample gradients)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_step():
            result = self.original_optimizer.step()
            return loss if result is None else result
        return None

    def zero_grad(self, set_to_none: bool = False):
        """Clear ``grad_sample`` and ``grad``; keep ``summed_grad`` if the last step was skipped."""
        for p in self.params:
            p.grad_sample = None
            clear_grad_sample_norms(p)
            if not self._is_last_step_skipped:
                p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none)

    # ------------------------------------------------------------------ checkpoints
    _DP_STATE_KEY = "dp_optimizer"

    def _dp_state(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "expected_batch_size": self.expected_batch_size,
            "loss_reduction": self.loss_reduction,
            "step_skip_queue": list(self._step_skip_queue),
            "is_last_step_skipped": self._is_last_step_skipped,
        }

    def _load_dp_state(self, dp_state: dict) -> None:
        self.noise_multiplier = dp_state["noise_multiplier"]
        self.max_grad_norm = dp_state["max_grad_norm"]
        self.expected_batch_size = dp_state["expected_batch_size"]
        self.loss_reduction = dp_state["loss_reduction"]
        self._step_skip_queue = list(dp_state["step_skip_queue"])
        self._is_last_step_skipped = dp_state["is_last_step_skipped"]

    def state_dict(self):
        """The wrapped optimizer's state dict plus the DP scalars under ``"dp_optimizer"``."""
        sd = self.original_optimizer.state_dict()
        sd[self._DP_STATE_KEY] = self._dp_state()
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Inverse of ``state_dict``; a plain torch.optim state dict loads the inner state only."""
        sd = dict(state_dict)
        dp_state = sd.pop(self._DP_STATE_KEY, None)
        self.original_optimizer.load_state_dict(sd)
        if dp_state is not None:
            self._load_dp_state(dp_state)

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

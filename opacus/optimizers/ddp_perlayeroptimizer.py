"""Per-layer clipping with data parallelism.

* ``SimpleDistributedPerLayerOptimizer``: per-layer clipping at ``step()`` followed by the same
  all-reduce as ``DistributedDPOptimizer`` (works with any way of computing ``grad_sample``).
* ``DistributedPerLayerOptimizer``: clips, noises and scales each parameter *during backward*, in a
  hook on the parameter's gradient, so that ``torch.nn.parallel.DistributedDataParallel`` can
  all-reduce that parameter's (already private) gradient while the rest of the backward runs.
  Per-layer clipping makes this possible: a parameter's clip factor depends on that parameter
  alone.  The model must be wrapped in torch's ``DistributedDataParallel`` (which averages the
  gradients over ranks) and its per-sample gradients must be set before the parameter's gradient
  is accumulated (``GradSampleModule`` with hooks does so).
"""

from functools import partial
from typing import Callable, List, Optional

import torch
import torch.nn as nn
from torch.optim import Optimizer

from opacus.optimizers import clipping
from opacus.optimizers.consumed import check_fresh, mark_consumed
from opacus.optimizers.ddpoptimizer import DistributedDPOptimizer
from opacus.optimizers.noise import gaussian_noise
from opacus.optimizers.optimizer import (
    DPOptimizer,
    _chunk_list,
    _concat,
    _missing_grad_sample_message,
)
from opacus.optimizers.perlayeroptimizer import (
    DPPerLayerOptimizer,
    per_layer_max_grad_norm,
    validated_per_layer_norms,
)
from opacus.optimizers.reduction import process_group_info


def _clip_and_accumulate_parameter(p: nn.Parameter, max_grad_norm: float) -> None:
    """Clip ``p``'s per-sample gradients (this parameter alone) and add their sum to
    ``p.summed_grad`` (created when None), on ``p``'s device.

    The factor is ``min(1, max_grad_norm / (norm + 1e-6))`` with ``norm`` the L2 norm of each
    sample's flattened gradient of ``p``.  Release once: the per-sample chunks must be fresh and
    are marked consumed, ``summed_grad`` must not have been released already.
    """
    owner = "_clip_and_accumulate_parameter"
    gs = getattr(p, "grad_sample", None)
    if gs is None:
        raise ValueError(_missing_grad_sample_message(owner, p, 0))
    chunks = _chunk_list(gs)
    check_fresh(chunks, owner=owner, what="p.grad_sample")
    summed = getattr(p, "summed_grad", None)
    check_fresh(summed, owner=owner, what="p.summed_grad")
    grad_sample = _concat(chunks)
    factors = clipping.clip_factors(clipping.per_sample_param_norms(grad_sample), max_grad_norm)
    clipped_sum = clipping.weighted_sum(factors, grad_sample).to(p.device)
    if summed is None:
        p.summed_grad = clipped_sum
    else:
        summed.add_(clipped_sum.to(summed.dtype))
    mark_consumed(chunks)


class SimpleDistributedPerLayerOptimizer(DPPerLayerOptimizer, DistributedDPOptimizer):
    """Per-layer clipping (``DPPerLayerOptimizer``) + noise on rank 0 and all-reduce at ``step``.

    Args:
        optimizer: the optimizer to wrap; its ``step`` runs on the private (clipped and noised)
            gradients.
        noise_multiplier: sigma: the noise standard deviation divided by ``max_grad_norm``.
        max_grad_norm: a list with the clipping norm of each parameter, in the order of the
            optimizer's parameters.
        expected_batch_size: the expected number of examples per logical batch (``sample_rate *
            len(dataset)``); the noised sum is divided by it when ``loss_reduction="mean"``. May be
            None only with ``loss_reduction="sum"``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the examples of a batch.
        generator: a ``torch.Generator`` for the noise (reproducible runs); None uses torch's
            default.
        secure_mode: draw the noise from a cryptographically secure source (no ``generator`` then).
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
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
            secure_mode=secure_mode,
            **kwargs,
        )


class DistributedPerLayerOptimizer(DPOptimizer):
    """Per-layer DP-SGD done in per-parameter gradient hooks, overlapping DDP's all-reduce.

    In the hook of parameter ``k``: clip its per-sample gradients to ``max_grad_norms[k]`` and add
    the sum to ``summed_grad``; on the last backward before a real step, rank 0 adds noise of std
    ``noise_multiplier * max_grad_norm`` (``max_grad_norm`` is the L2 norm of the per-layer
    bounds), the result is divided by ``expected_batch_size`` ("mean") or multiplied by the world
    size ("sum", undoing DDP's average) and returned as the gradient DDP then averages.
    On a virtual (skipped) step the hook returns zeros and only accumulates.

    Args:
        optimizer: the optimizer to wrap; its ``step`` runs on the private (clipped and noised)
            gradients.
        noise_multiplier: sigma: the noise standard deviation divided by ``max_grad_norm``.
        max_grad_norm: a list with the clipping norm of each parameter, in the order of the
            optimizer's parameters.
        expected_batch_size: the expected number of examples per logical batch (``sample_rate *
            len(dataset)``); the noised sum is divided by it when ``loss_reduction="mean"``. May be
            None only with ``loss_reduction="sum"``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the examples of a batch.
        generator: a ``torch.Generator`` for the noise (reproducible runs); None uses torch's
            default.
        secure_mode: draw the noise from a cryptographically secure source (no ``generator`` then).
    """

    max_grad_norm = per_layer_max_grad_norm

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: List[float],
        expected_batch_size: Optional[int],
        loss_reduction: str = "mean",
        generator=None,
        secure_mode: bool = False,
        **kwargs,
    ):
        self.max_grad_norms = validated_per_layer_norms(optimizer, max_grad_norm)
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
            secure_mode=secure_mode,
            **kwargs,
        )
        self.rank, self.world_size = process_group_info(type(self).__name__)
        self._released_since_step = False
        self._hook_handles = [
            p.register_hook(partial(self._private_grad_hook, p, k))
            for k, p in enumerate(self.params)
        ]

    def _private_grad_hook(self, p: torch.Tensor, k: int, grad: torch.Tensor) -> torch.Tensor:
        # Release once: the chunks must be fresh and the running sum unreleased (both checked
        # and the chunks marked by _clip_and_accumulate_parameter); the released sum is marked.
        chunks = _chunk_list(self._chunks_of(p, k, type(self).__name__))
        _clip_and_accumulate_parameter(p, self.max_grad_norms[k])
        if self._check_skip_next_step(pop_next=False):
            return torch.zeros_like(grad)
        private = p.summed_grad.clone()
        mark_consumed(p.summed_grad)
        self._released_since_step = True
        if self.rank == 0:
            private += gaussian_noise(
                self._noise_std(), private, generator=self.generator, secure_mode=self.secure_mode
            )
        if self.loss_reduction == "mean":
            private /= self.expected_batch_size * len(chunks)
        else:
            private *= self.world_size
        return private.view_as(grad).to(grad.dtype)

    @property
    def accumulated_iterations(self) -> int:
        """Number of batches held in ``grad_sample`` (chunks of a list; 1 for a tensor)."""
        return DPOptimizer.accumulated_iterations.fget(self)

    def clip_and_accumulate(self):
        """Nothing to do: clipping happened in the gradient hooks during backward."""

    def add_noise(self):
        """Nothing to do: noise was added in the gradient hooks during backward."""

    def scale_grad(self):
        """Nothing to do: the hooks scaled the gradients before DDP reduced them."""

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Consume the skip signal; on a real step run the step hook (accountant).

        A real step needs a backward pass whose hooks released the gradients since the last
        step: a second ``step()`` would apply (and account) the same release twice.

        Args:
            closure: unused; accepted for the ``Optimizer.step`` interface.

        Returns:
            True if the wrapped optimizer should step (False while accumulating virtual steps).

        Raises:
            ValueError: no gradients were released since the last step.
        """
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        if not getattr(self, "_released_since_step", False):
            raise ValueError(
                f"{type(self).__name__}: step() found no gradients released since the last step "
                "(the per-parameter hooks run during backward): run forward and backward before "
                "each step(), call optimizer.step() once per backward pass and "
                "optimizer.zero_grad() after it"
            )
        self._released_since_step = False
        return self._finish_real_step()

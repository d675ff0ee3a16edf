"""``DPOptimizerFastGradientClipping``: the optimizer half of (ghost) fast gradient clipping.

With ``GradSampleModuleFastGradientClipping`` and ``DPLossFastGradientClipping`` the clipping
happens inside the loss's double backward (Lee & Kifer 2021; Li et al. 2022, "ghost clipping"):
after ``loss.backward()``, ``p.grad`` already holds ``sum_i c_i * g_i``, the clipped sum.  This
optimizer moves it into ``summed_grad`` (``accumulate``) and then noises and scales it exactly
as ``DPOptimizer`` does; it never sees per-sample gradients.

Because ``p.grad`` is trusted to be already clipped, a plain ``loss.backward()`` of an ordinary
criterion would silently release *unclipped* gradients with noise calibrated to
``max_grad_norm``.  The double backward therefore records itself on the optimizer
(``record_clipped_backward``) and ``accumulate`` refuses gradients that no clipped backward
produced since the last step / ``zero_grad``.

Release once (``opacus.optimizers.consumed``): the clipped ``p.grad`` this optimizer adds to
``summed_grad`` is marked as consumed, and so is the noisy ``p.grad`` a step releases; meeting a
marked ``p.grad`` or an already noised ``summed_grad`` again (a second ``step()`` after one
backward, a forgotten ``optimizer.zero_grad()``, ``model.zero_grad()`` in its place) raises
instead of releasing the same samples twice.
"""

from typing import Callable, Optional

import torch
from torch.optim import Optimizer

from opacus.optimizers import optimizer as _optimizer
from opacus.optimizers.consumed import check_fresh, is_consumed, mark_consumed
from opacus.optimizers.optimizer import DPOptimizer


class DPOptimizerFastGradientClipping(DPOptimizer):
    """``DPOptimizer`` that reads the clipped sum from ``p.grad`` instead of ``p.grad_sample``.

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
        # Clipped (double) backward passes since the gradients were last consumed or zeroed.
        self._clipped_backward_count = 0

    def prepare_clipped_backward(self, params) -> None:
        """Called by the double backward before its passes (``ClippedSumOptimizer``).

        A ``p.grad`` that a step consumed but that was zeroed in place since (e.g.
        ``model.zero_grad(set_to_none=False)``) holds no sample's data: the pass gets a fresh
        one, so that it is not taken for a stale sum.  A consumed, non-zero ``p.grad`` stays as
        it is and is refused at ``step()``."""
        for p in params:
            if is_consumed(p.grad) and not p.grad.any():
                p.grad = torch.zeros_like(p.grad)

    def record_clipped_backward(self) -> None:
        """Called by the double backward once ``p.grad`` holds a clipped sum."""
        self._clipped_backward_count = getattr(self, "_clipped_backward_count", 0) + 1

    # Old private name, kept while callers (opacus.integrations) move to the public one.
    _record_clipped_backward = record_clipped_backward

    def _consume_clipped_backward(self, params=None) -> None:
        """Refuse gradients that did not come from a clipped backward; reset the record."""
        if getattr(self, "_clipped_backward_count", 0) == 0 and any(
            p.grad is not None for p in (self.params if params is None else params)
        ):
            raise RuntimeError(
                f"{type(self).__name__}: p.grad is set but no clipped backward ran since the "
                "last step/zero_grad, so p.grad holds UNCLIPPED gradients (a plain "
                "loss.backward() of an ordinary criterion?) and releasing them would break "
                "differential privacy. With grad_sample_mode='ghost' use the criterion returned "
                "by make_private (DPLossFastGradientClipping): loss = criterion(output, target); "
                "loss.backward(); and call optimizer.zero_grad() before each backward"
            )
        self._accumulated_backwards = max(1, getattr(self, "_clipped_backward_count", 0))
        self._clipped_backward_count = 0

    @property
    def accumulated_iterations(self) -> int:
        """Clipped (double) backward passes whose sums the last ``accumulate`` took from
        ``p.grad``: 1, or k after k DP-loss backward passes before one step (gradient
        accumulation). ``scale_grad`` divides by ``expected_batch_size`` times it and the
        accountant records ``sample_rate`` times it, as for ``DPOptimizer``'s chunks."""
        return getattr(self, "_accumulated_backwards", 1)

    def clipped_backwards_pending(self) -> int:
        """Clipped backward passes whose sums wait in ``p.grad`` for the next step."""
        return getattr(self, "_clipped_backward_count", 0)

    def _clipped_sum_of(self, p: torch.Tensor, index: int) -> torch.Tensor:
        if p.grad is None:
            raise ValueError(
                f"parameter {index} (shape {tuple(p.shape)}) requires grad but p.grad is None: "
                "compute the loss with DPLossFastGradientClipping (its backward() leaves the "
                "clipped sum in p.grad) before step(), and freeze unused parameters"
            )
        return p.grad

    def accumulate(self):
        """Add ``p.grad`` (the clipped sum from the double backward) to ``p.summed_grad``."""
        self._accumulate_clipped_sums(copy=True)

    def _accumulate_clipped_sums(self, *, copy: bool) -> None:
        """``accumulate``; ``copy=False``: a first ``summed_grad`` shares ``p.grad``'s memory
        instead of copying it (only for a real step, whose noising replaces ``p.grad`` right
        away: a virtual step's ``p.grad`` stays, and ``zero_grad`` would zero it in place)."""
        params = self.params
        self._check_release_once(params)
        for i, p in enumerate(params):
            clipped_sum = self._clipped_sum_of(p, i)
            if getattr(p, "summed_grad", None) is None:
                # detach(): another tensor object, so p.grad's consumed mark is not its own.
                p.summed_grad = clipped_sum.detach().clone() if copy else clipped_sum.detach()
            else:
                p.summed_grad.add_(clipped_sum)
            mark_consumed(p.grad)

    def _check_release_once(self, params=None) -> None:
        """Refuse a ``p.grad`` or ``summed_grad`` an earlier step used, then gradients that no
        clipped backward produced (module docstring)."""
        owner = type(self).__name__
        params = self.params if params is None else params
        for p in params:
            check_fresh(p.grad, owner=owner, what="the clipped p.grad")
            check_fresh(getattr(p, "summed_grad", None), owner=owner, what="p.summed_grad")
        self._consume_clipped_backward(params)

    def clip_and_accumulate(self):
        """Same as ``accumulate``: the clipping already happened in the double backward."""
        self.accumulate()

    def add_noise(self):
        """``p.grad = summed_grad + N(0, (noise_multiplier * max_grad_norm)^2)``."""
        super().add_noise()

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Accumulate; unless skipped, noise, scale and run the step hook.

        Args:
            closure: unused; accepted for the ``Optimizer.step`` interface.

        Returns:
            True if the wrapped optimizer should step, False for a virtual (skipped) step.
        """
        cls = type(self)
        if (
            cls.accumulate is DPOptimizerFastGradientClipping.accumulate
            and cls.add_noise in _optimizer._PLAIN_ADD_NOISE
        ):
            # A real step's noising replaces p.grad by a new tensor at once: the clipped sum in
            # p.grad needs no copy (a subclass's own stages keep the copying accumulate).
            self._accumulate_clipped_sums(copy=self.next_step_skipped())
        else:
            self.accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self._noise_and_scale()
        for p in self.params:
            # The released update and the sum it came from: never to be released again.
            mark_consumed(p.grad)
            mark_consumed(p.summed_grad)
        return self._finish_real_step()

    def zero_grad(self, set_to_none: bool = False):
        """Clear ``grad`` (and ``summed_grad`` unless the last step was skipped).

        Args:
            set_to_none: set ``p.grad`` to None instead of zeroing it.
        """
        self._clipped_backward_count = 0
        params = self.params
        if not self._is_last_step_skipped:
            for p in params:
                p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none)
        for p in params:
            if is_consumed(p.grad):
                # Zeroed in place, the tensor would keep its mark: the next backward's clipped
                # sum is fresh and goes into a fresh tensor.
                p.grad = torch.zeros_like(p.grad)


_optimizer._PLAIN_ADD_NOISE.add(DPOptimizerFastGradientClipping.add_noise)

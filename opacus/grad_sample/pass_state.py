"""Per-backward-pass concerns of the grad-sample hooks, each a small object with its own state.

``GradSampleHooks.capture_backprops_hook`` routes every call's output gradient through these:

* ``PassRecord``: what the pass has touched so far (the parameters given a contribution, the
  layers whose first call arrived) and whether its end-of-pass callback is queued.
* ``ReductionScale``: where the ``loss_reduction="mean"`` factor ``B`` goes. A per-sample
  gradient is linear in the backprops, so ``B`` can multiply whichever is smaller: the
  backprops, or the sampler's output (or the ghost norms).
* ``DeferredContractions``: repeated calls of a layer whose sampler sums over the sequence
  dimension (DP RNN cells, one call per time step) are kept and contracted once at the end of
  the pass: one ``(B, d_out, sum_t T_t) @ (B, sum_t T_t, d_in)`` product replaces one product
  and one ``(B, d_out, d_in)`` accumulation per call.
* ``NormBook``: exact per-sample norms that came for free with a parameter's only contribution
  of the pass (book-keeping, Bu et al. 2023); once the pass is complete they are attached to
  ``p.grad_sample`` for the optimizer (``opacus.optimizers.optimizer.cached_grad_sample_norms``).
"""

from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["DeferredContractions", "NormBook", "PassRecord", "ReductionScale"]


class ReductionScale:
    """The ``"mean"`` factor of one call: its batch size, or None for ``"sum"``."""

    def __init__(self, loss_reduction: str):
        self.loss_reduction = loss_reduction

    def factor(self, max_batch_len: int) -> Optional[int]:
        """``max_batch_len`` under ``"mean"`` (each output gradient is ``1/B`` of the sample's
        own loss gradient), None under ``"sum"``."""
        return max_batch_len if self.loss_reduction == "mean" else None

    @staticmethod
    def scale_output_instead(backprops: torch.Tensor, params, only_call: bool) -> bool:
        """True if multiplying the per-sample gradients is cheaper than the backprops (e.g. a
        convolution on a large image, whose backprops dwarf its kernel); only for a layer's
        only call of the pass, whose gradients are not accumulated with another call's."""
        out_numel = backprops.shape[0] * sum(p.numel() for p in params if p.requires_grad)
        return only_call and out_numel < backprops.numel()


class DeferredContractions:
    """Calls whose per-sample gradients are contracted together at the end of the pass."""

    def __init__(self):
        self._calls: Dict[nn.Module, List[tuple]] = {}

    def defer(self, module: nn.Module, activations, backprops, max_batch_len: int) -> None:
        """Keep one call of ``module`` for the end of the pass."""
        self._calls.setdefault(module, []).append((activations, backprops, max_batch_len))

    def take(self) -> Iterator[Tuple[nn.Module, List[tuple]]]:
        """Every module's kept calls, forgetting them."""
        calls, self._calls = self._calls, {}
        return iter(calls.items())

    def clear(self) -> None:
        """Forget every kept call (a failed pass)."""
        self._calls = {}


class NormBook:
    """Exact per-sample norms of the parameters whose only contribution of the pass came with
    them; a second contribution (a shared parameter) makes them stale."""

    def __init__(self):
        self._norms: Dict[int, tuple] = {}

    def record(self, p: nn.Parameter, norms: Optional[tuple], first: bool) -> None:
        """``p`` got a contribution; ``norms`` its exact norms if known, ``first`` whether it
        is ``p``'s first contribution of the pass."""
        if first and norms is not None:
            self._norms[id(p)] = norms
        else:
            self._norms.pop(id(p), None)

    def take(self) -> Dict[int, tuple]:
        """``{id(p): norms}`` of the pass, forgetting them."""
        norms, self._norms = self._norms, {}
        return norms

    def clear(self) -> None:
        """Forget every norm (a failed pass)."""
        self._norms = {}


class PassRecord:
    """What one backward pass has touched so far; reset when the pass ends (or fails)."""

    def __init__(self):
        self.params: Dict[int, nn.Parameter] = {}
        self.modules: set = set()
        self.finish_queued = False

    def first_call(self, module: nn.Module) -> bool:
        """True if this is the first call of ``module`` whose output gradient this pass saw."""
        first = module not in self.modules
        self.modules.add(module)
        return first

    def add(self, p: nn.Parameter) -> None:
        """``p`` got a contribution in this pass."""
        self.params[id(p)] = p

    def take(self) -> List[nn.Parameter]:
        """The parameters of the pass, in order of their first contribution; resets."""
        params = list(self.params.values())
        self.reset()
        return params

    def reset(self) -> None:
        """Forget the pass."""
        self.params = {}
        self.modules = set()
        self.finish_queued = False

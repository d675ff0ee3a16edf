"""The calls of the hooked layers whose output gradient is still to come: ``CallCapture``.

A forward hook captures each call's (detached) inputs; the hook on that call's output hands its
gradient to ``GradSampleHooks``, which takes the call back from here.  Between the two, this
object holds the calls (several per layer: RNN time steps, a layer used twice), each layer's
largest batch among its pending calls (packed sequences shrink later steps), the call whose
output hook is running, and each trainable parameter's ``_forward_counter`` (its layer's calls
still pending).  It is owned by the hooks object and has no other state.
"""

from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch.nn as nn

__all__ = ["CallCapture"]


class _Call(list):
    """One call's captured inputs; weakly referenced by the hook on that call's output.

    ``hook`` is a weak reference to that hook (None if the output needed no gradient): the hook
    lives as long as the output's autograd node, so once it is gone no gradient can ever reach
    the call (e.g. an output the loss never used) and its inputs are dropped.
    """

    __slots__ = ("__weakref__", "hook")

    def __init__(self, activations: list):
        super().__init__(activations)
        self.hook = None

    def orphaned(self) -> bool:
        """True if no backward pass can deliver this call's output gradient any more."""
        return self.hook is None or self.hook() is None


class CallCapture:
    """The pending calls of every hooked layer, and their per-parameter count.

    Args:
        hooked_parameters: ``module -> parameters`` whose per-sample gradients the module's hook
            computes (``GradSampleHooks.hooked_parameters``): their ``_forward_counter`` counts
            the module's pending calls.

    ``firing`` is the call whose output hook is running (``pop`` takes exactly that one); the
    hooks set it around ``capture_backprops_hook``.
    """

    def __init__(self, hooked_parameters: Callable[[nn.Module], Iterable[nn.Parameter]]):
        self._hooked_parameters = hooked_parameters
        self._activations: Dict[nn.Module, List[list]] = {}
        # The call whose output hook is running (capture_backprops_hook pops exactly that one).
        self.firing: Optional[list] = None
        self._max_batch_len: Dict[nn.Module, int] = {}

    # ------------------------------------------------------------ forward side
    def capture(self, module: nn.Module, activations: list, batch: int) -> _Call:
        """Keep one call of ``module`` (its inputs, batch size ``batch``); returns the call,
        whose ``hook`` the caller sets to a weak reference to the call's output hook."""
        call = _Call(activations)
        self._activations.setdefault(module, []).append(call)
        self._count_calls(module, +1)
        self._max_batch_len[module] = max(self._max_batch_len.get(module, 0), batch)
        return call

    # ----------------------------------------------------------------- queries
    def count(self, module: nn.Module) -> int:
        """The number of ``module``'s pending calls."""
        return len(self._activations.get(module, ()))

    def counts(self) -> Dict[nn.Module, int]:
        """``{module: number of pending calls}`` for every module with captured calls (a module
        may stay with 0 until the next prune); empty when nothing is pending."""
        return {module: len(calls) for module, calls in self._activations.items()}

    def pending_calls(self) -> Iterator[list]:
        """Every pending call's captured inputs."""
        for calls in self._activations.values():
            yield from calls

    def first_input(self, module: nn.Module):
        """The first captured input of ``module``'s first pending call (None if none)."""
        calls = self._activations.get(module)
        return calls[0][0] if calls and len(calls[0]) else None

    def max_batch_len(self, module: nn.Module) -> int:
        """The largest batch among ``module``'s pending calls."""
        return self._max_batch_len[module]

    def answerable(self, module: nn.Module) -> int:
        """The number of ``module``'s pending calls, or 0 if the firing call is not one of them
        (its inputs were dropped: a failed pass, a cleared state)."""
        calls = self._activations.get(module)
        if not calls:
            return 0
        firing = self.firing
        if firing is not None and not any(c is firing for c in calls):
            return 0
        return len(calls)

    # ----------------------------------------------------------- backward side
    def pop(self, module: nn.Module) -> list:
        """Remove and return the call whose output hook is firing (else the latest call)."""
        calls = self._activations[module]
        firing = self.firing
        index = next((i for i, c in enumerate(calls) if c is firing), len(calls) - 1)
        self._count_calls(module, -1)
        return calls.pop(index)

    def release(self, module: nn.Module) -> int:
        """``module``'s largest batch, forgetting the module once no call of it is pending."""
        max_batch_len = self._max_batch_len[module]
        if not self._activations[module]:
            del self._activations[module]
            del self._max_batch_len[module]
        return max_batch_len

    def forget(self, modules: Optional[Iterable[nn.Module]] = None) -> None:
        """Drop the captured inputs of ``modules`` (default: all): no gradient will use them."""
        for module in list(self._activations if modules is None else modules):
            calls = self._activations.pop(module, None)
            if calls:
                self._count_calls(module, -len(calls))
            self._max_batch_len.pop(module, None)

    def prune_orphans(self) -> None:
        """Drop the inputs of calls whose output gradient can no longer arrive (``_Call``)."""
        for module in list(self._activations):
            calls = self._activations[module]
            kept = [c for c in calls if not c.orphaned()]
            self._count_calls(module, len(kept) - len(calls))
            calls[:] = kept
            if not calls:
                del self._activations[module]
                self._max_batch_len.pop(module, None)

    def _count_calls(self, module: nn.Module, delta: int) -> None:
        # p._forward_counter: this module's calls whose output gradient is still to come.
        for p in self._hooked_parameters(module):
            if p.requires_grad:
                p._forward_counter = max(0, getattr(p, "_forward_counter", 0) + delta)

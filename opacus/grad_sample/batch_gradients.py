"""Keeping hooked parameters out of the autograd graph when only per-sample gradients are used.

``loss.backward()`` on a hooked model computes two things for every trainable layer: the
per-sample gradients (the hooks) and the ordinary batch gradient ``p.grad`` (autograd's own
weight-gradient products).  Under ``PrivacyEngine`` the DP optimizer replaces ``p.grad`` with the
noisy sum of clipped per-sample gradients, so the batch gradient is computed only to be thrown
away (and, being non-private, it is better never to hand it out).  For a convolution that is
about half of its backward pass.

With ``compute_batch_gradients = False`` on the hooks object, ``BatchGradientSwitch`` runs each
hooked layer's forward with its parameters' ``requires_grad`` switched off (and restored right
after, even if the forward raises), so autograd records no path to them.  The backward hooks only
need the gradient of the layer's *output*; when the output needs no gradient once the parameters
are out of the graph (a first layer, whose input needs none), ``GradPath`` gives it one through
a scalar anchor, so the gradient still flows down to the layer and its hook fires.  After the
backward pass the parameters have ``grad_sample`` but no ``grad``.  On torch < 2.1 (no
``always_call`` forward hooks, so no restore after a forward that raises) the switch is not
installed and the batch gradients are computed as before.
"""

from typing import Dict, List

import torch
import torch.nn as nn


class GradPath(torch.autograd.Function):
    """Identity on ``output`` that makes it require grad through ``anchor`` (a scalar leaf that
    requires grad); the backward passes the gradient through and gives the anchor none."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """``output``'s values, now on a path to ``anchor``.

        A fresh alias, not ``output`` itself: an input returned as-is becomes a view of it,
        and autograd would refuse the in-place op that often follows a layer
        (``nn.ReLU(inplace=True)``).
        """
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        """The output gradient passes through; the anchor gets none."""
        return grad_output, None


def _with_grad_path(output, anchor: torch.Tensor):
    if torch.is_tensor(output):
        if output.requires_grad or not output.is_floating_point():
            return output
        return GradPath.apply(output, anchor)
    if type(output) in (tuple, list):
        return type(output)(_with_grad_path(o, anchor) for o in output)
    return output


class BatchGradientSwitch:
    """Forward pre-hook and forward hook that keep a hooked layer's parameters out of the graph
    while ``owner.compute_batch_gradients`` is False (module docstring).

    ``owner`` is the hooks object: it provides ``compute_batch_gradients``, ``hooks_enabled`` and
    ``hooked_parameters(module)`` (the parameters whose per-sample gradients the layer's hook
    computes).
    """

    def __init__(self, owner):
        self.owner = owner
        self.anchor = torch.zeros((), requires_grad=True)
        # Parameters switched off by each layer's pending forward calls (a stack: re-entrant).
        self._switched: Dict[nn.Module, List[List[nn.Parameter]]] = {}

    def before_forward(self, module: nn.Module, _inputs) -> None:
        """Forward pre-hook: switch off ``requires_grad`` of the layer's trainable parameters."""
        owner = self.owner
        if (
            owner.compute_batch_gradients
            or not owner.hooks_enabled
            or not module.training
            or not torch.is_grad_enabled()
        ):
            return
        params = [p for p in owner.hooked_parameters(module) if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        self._switched.setdefault(module, []).append(params)

    def after_forward(self, module: nn.Module, _inputs, output):
        """Forward hook (also run when the forward raises): restore ``requires_grad``; give the
        output a gradient path if it lost its only one with the parameters."""
        stack = self._switched.get(module)
        if not stack:
            return None
        params = stack.pop()
        for p in params:
            p.requires_grad_(True)
        if not params:
            return None
        return _with_grad_path(output, self.anchor)

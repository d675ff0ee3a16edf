"""Per-sample gradients of any layer with ``torch.func``: the fallback for layers without a sampler.

For one layer ``y = f(theta, x)`` and the gradient ``g = dL/dy`` of the batched loss,
sample ``i``'s gradient is ``d/dtheta <f(theta, x_i), g_i>`` (the chain rule restricted to the
sample's own slice). ``grad`` differentiates that scalar and ``vmap`` maps it over the batch,
which runs the layer once per sample without a Python loop.
"""

import copy
import weakref
from collections import OrderedDict
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from opacus.layers.dp_rnn import RNNLinear  # noqa: F401  (re-exported, as in Opacus 1.6)

__all__ = ["RNNLinear", "ft_compute_per_sample_gradient", "make_functional", "prepare_layer"]


def make_functional(mod: nn.Module, disable_autograd_tracking: bool = False):
    """Split ``mod`` into a pure function ``fmodel(params, *args, **kwargs)`` and its parameters.

    ``params`` is a tuple in ``mod.named_parameters()`` order; ``fmodel`` runs ``mod``'s forward
    with those tensors in place of its parameters (``torch.func.functional_call``), leaving ``mod``
    untouched. ``disable_autograd_tracking`` returns detached parameters.
    """
    names = [name for name, _ in mod.named_parameters()]
    params = tuple(
        p.detach() if disable_autograd_tracking else p for _, p in mod.named_parameters()
    )

    def fmodel(new_params, *args, **kwargs):
        return functional_call(mod, dict(zip(names, new_params)), args, kwargs)

    return fmodel, params


# Layout recorded by ``prepare_layer`` for ``ft_compute_per_sample_gradient``; weak keys, so the
# layers themselves carry no extra attribute and are freed normally.
_PREPARED_LAYOUT: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _sample_dim(layer: nn.Module, batch_first: bool) -> int:
    # The hooks hand over tensors with the batch on dim 0; one sample is re-inserted where the
    # layer expects its batch dimension.
    if batch_first or getattr(layer, "_batch_dim_always_first", False):
        return 0
    return 1


def _without_hooks(layer: nn.Module) -> nn.Module:
    """A shallow copy of ``layer``'s subtree (same parameters and buffers) with no module hooks.

    The per-sample function must not re-enter the hooks that called it (they would capture
    activations again, and torch's backward-hook function does not support ``vmap``); children
    are copied too, as they may carry hooks of their own.
    """
    clone = copy.copy(layer)
    for attr in (
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
    ):
        if attr in clone.__dict__:
            setattr(clone, attr, OrderedDict())
    clone._is_full_backward_hook = None
    # ``functional_call`` swaps entries of ``_parameters``: give the copy its own dicts so the
    # original layer never sees the swapped tensors.
    clone._parameters = OrderedDict(layer._parameters)
    clone._buffers = OrderedDict(layer._buffers)
    clone._modules = OrderedDict(
        (name, None if child is None else _without_hooks(child))
        for name, child in layer._modules.items()
    )
    return clone


def prepare_layer(layer: nn.Module, batch_first=True) -> Callable:
    """Build ``per_sample_grad(params, activations, backprops)`` for one sample of ``layer``.

    ``params`` maps the names of the layer's own trainable parameters to tensors, ``activations``
    is a tuple with one sample's inputs (batch dimension removed) and ``backprops`` that sample's
    output gradient. The function returns the gradients as a dict keyed like ``params``; it is
    meant to be ``vmap``-ed over the batch (``ft_compute_per_sample_gradient`` does so).
    ``batch_first`` is also remembered (outside the layer, which is not modified) for later
    ``ft_compute_per_sample_gradient(layer, ...)`` calls.
    """
    _PREPARED_LAYOUT[layer] = batch_first
    return _sample_grad_fn(layer, batch_first)


def _sample_grad_fn(layer: nn.Module, batch_first: bool) -> Callable:
    dim = _sample_dim(layer, batch_first)
    layer = _without_hooks(layer)

    def sample_loss(params, activations, backprops):
        inputs = tuple(a.unsqueeze(dim) if torch.is_tensor(a) else a for a in activations)
        output = functional_call(layer, params, inputs)
        if not torch.is_tensor(output):
            raise NotImplementedError(
                f"{type(layer).__name__} returns {type(output).__name__}, not one tensor: the "
                "functorch fallback needs a single-tensor output. Register a grad sampler for it "
                "with opacus.grad_sample.register_grad_sampler."
            )
        return (output * backprops.unsqueeze(dim)).sum()

    return grad(sample_loss)


def _own_trainable_params(layer: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in layer.named_parameters(recurse=False) if p.requires_grad]


def ft_compute_per_sample_gradient(layer, activations, backprops):
    """Per-sample gradients ``{param: (batch, *param.shape)}`` of ``layer``'s own parameters.

    ``activations`` (list of the layer's positional inputs) and ``backprops`` carry the batch on
    dim 0, as the hooks provide them. The layer itself is assumed to expect its batch where
    ``prepare_layer(layer, batch_first)`` last said (dim 0 if it was never called).
    """
    return per_sample_gradient(
        layer, activations, backprops, batch_first=_PREPARED_LAYOUT.get(layer, True)
    )


def per_sample_gradient(
    layer: nn.Module, activations, backprops: torch.Tensor, *, batch_first: bool
) -> Dict[nn.Parameter, torch.Tensor]:
    """``ft_compute_per_sample_gradient`` with the layer's layout given explicitly."""
    named = _own_trainable_params(layer)
    if not named:
        return {}
    if torch.is_tensor(activations):
        activations = [activations]
    activations = tuple(activations)
    params = {n: p.detach() for n, p in named}
    in_dims = tuple(0 if torch.is_tensor(a) else None for a in activations)
    per_sample = vmap(_sample_grad_fn(layer, batch_first), in_dims=(None, in_dims, 0))(
        params, activations, backprops
    )
    return {p: per_sample[n] for n, p in named}

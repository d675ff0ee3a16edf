"""Per-sample gradients of any layer with ``torch.func``: the fallback for layers without a sampler.

For one layer ``y = f(theta, x)`` and the gradient ``g = dL/dy`` of the batched loss,
sample ``i``'s gradient is ``d/dtheta <f(theta, x_i), g_i>`` (the chain rule restricted to the
sample's own slice). ``grad`` differentiates that scalar and ``vmap`` maps it over the batch,
which runs the layer once per sample without a Python loop.

A layer handled this way is handled *whole*: the parameters of its children are differentiated
with its own (the hooks do not visit the children).  ``prepare_layer`` gives the layer the
attribute ``ft_compute_sample_grad`` (as Opacus 1.6 does) when the hooks are installed; the hooks
remove it again with the other hooks.
"""

import copy
import weakref
from collections import OrderedDict
from typing import Dict, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from opacus.layers.dp_rnn import RNNLinear  # noqa: F401  (re-exported, as in Opacus 1.6)

__all__ = [
    "FT_COMPUTE_SAMPLE_GRAD_ATTR",
    "RNNLinear",
    "ft_compute_per_sample_gradient",
    "make_functional",
    "per_sample_gradient",
    "prepare_layer",
]

# The attribute ``prepare_layer`` sets on a layer (the name Opacus 1.6 uses).
FT_COMPUTE_SAMPLE_GRAD_ATTR = "ft_compute_sample_grad"


def make_functional(mod: nn.Module, disable_autograd_tracking: bool = False):
    """Split ``mod`` into a pure function ``fmodel(params, *args, **kwargs)`` and its parameters.

    ``params`` is a tuple in ``mod.named_parameters()`` order; ``fmodel`` runs ``mod``'s forward
    with those tensors in place of its parameters (``torch.func.functional_call``), leaving ``mod``
    untouched. ``disable_autograd_tracking`` returns detached parameters.

    Args:
        mod: the module to split.
        disable_autograd_tracking: return the parameters detached.
    """
    names = [name for name, _ in mod.named_parameters()]
    params = tuple(
        p.detach() if disable_autograd_tracking else p for _, p in mod.named_parameters()
    )

    def fmodel(new_params, *args, **kwargs):
        return functional_call(mod, dict(zip(names, new_params)), args, kwargs)

    return fmodel, params


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
    are copied too, as they may carry hooks of their own.  Built at each use, so the copy sees
    the layer as it is then (training flag, attributes).
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


def _check_preparable(layer: nn.Module) -> None:
    if isinstance(layer, nn.EmbeddingBag):
        raise NotImplementedError(
            "prepare_layer: nn.EmbeddingBag is not supported by the torch.func fallback (its "
            "1-D input and offsets have no per-sample batch dimension); use its registered grad "
            "sampler (grad_sample_mode='hooks', not 'functorch')"
        )
    buffers = [name for name, _ in layer.named_buffers()]
    if buffers:
        raise NotImplementedError(
            f"prepare_layer: {type(layer).__name__} has buffers ({', '.join(buffers[:5])}), "
            "which the torch.func fallback cannot handle. Register a grad sampler for it with "
            "opacus.grad_sample.register_grad_sampler, or freeze its parameters."
        )


def _per_sample_grads(
    layer: nn.Module,
    params: Dict[str, torch.Tensor],
    activations,
    backprops: torch.Tensor,
    batch_first: bool,
) -> Dict[str, torch.Tensor]:
    """``{name: (batch, *shape)}``: per-sample gradients w.r.t. ``params`` (named as in
    ``layer.named_parameters()``; the layer's other parameters are held fixed)."""
    if torch.is_tensor(activations):
        activations = (activations,)
    activations = tuple(activations)
    dim = _sample_dim(layer, batch_first)
    clone = _without_hooks(layer)

    def sample_loss(diff_params, sample_inputs, sample_backprops):
        inputs = tuple(a.unsqueeze(dim) if torch.is_tensor(a) else a for a in sample_inputs)
        output = functional_call(clone, diff_params, inputs)
        if not torch.is_tensor(output):
            raise NotImplementedError(
                f"{type(layer).__name__} returns {type(output).__name__}, not one tensor: the "
                "functorch fallback needs a single-tensor output. Register a grad sampler for it "
                "with opacus.grad_sample.register_grad_sampler."
            )
        return (output * sample_backprops.unsqueeze(dim)).sum()

    in_dims = tuple(0 if torch.is_tensor(a) else None for a in activations)
    return vmap(grad(sample_loss), in_dims=(None, in_dims, 0))(params, activations, backprops)


class _ComputeSampleGrad:
    """The callable ``prepare_layer`` stores: ``(params, activations, backprops) -> tuple``.

    ``params`` are the tensors to use for ``layer.parameters()`` (recursive, in that order),
    ``activations`` the layer's input (or a sequence of its positional inputs) and
    ``backprops`` the output gradient, both with the batch on dim 0.  Returns one per-sample
    gradient ``(batch, *shape)`` per parameter, in the same order.  Holds the layer weakly (the
    attribute would otherwise make a reference cycle).
    """

    def __init__(self, layer: nn.Module, batch_first: bool):
        self._layer = weakref.ref(layer)
        self.batch_first = batch_first

    def __call__(self, params: Sequence[torch.Tensor], activations, backprops: torch.Tensor):
        layer = self._layer()
        if layer is None:
            raise RuntimeError("ft_compute_sample_grad: its layer no longer exists")
        names = [name for name, _ in layer.named_parameters()]
        params = list(params)
        if len(params) != len(names):
            raise ValueError(
                f"ft_compute_sample_grad of {type(layer).__name__}: got {len(params)} parameter "
                f"tensors, expected {len(names)} (one per layer.parameters(), in that order)"
            )
        grads = _per_sample_grads(
            layer, dict(zip(names, params)), activations, backprops, self.batch_first
        )
        return tuple(grads[name] for name in names)


def prepare_layer(layer: nn.Module, batch_first=True) -> None:
    """Give ``layer`` the attribute ``ft_compute_sample_grad`` (see ``_ComputeSampleGrad``).

    ``batch_first=False`` re-inserts each sample on dim 1 of the layer's input (on dim 0 for
    layers whose class sets ``_batch_dim_always_first``, e.g. ``RNNLinear``).

    Raises:
        NotImplementedError: ``layer`` (or a submodule) has buffers, or is an ``nn.EmbeddingBag``.

    Args:
        layer: the layer to prepare.
        batch_first: True if the batch is on dim 0 of the layer's input, False for dim 1.
    """
    _check_preparable(layer)
    setattr(layer, FT_COMPUTE_SAMPLE_GRAD_ATTR, _ComputeSampleGrad(layer, batch_first))


def ft_compute_per_sample_gradient(layer, activations, backprops):
    """Per-sample gradients ``{param: (batch, *param.shape)}`` over all of ``layer.parameters()``.

    ``activations`` (the layer's input, or a list of its positional inputs) and ``backprops``
    carry the batch on dim 0, as the hooks provide them.  The layer is prepared first
    (``prepare_layer(layer)``, batch first) if it has no ``ft_compute_sample_grad`` yet.
    Floating-point activations are cast to the backprops' dtype.

    Args:
        layer: the layer.
        activations: its input (or list of positional inputs), batch on dim 0.
        backprops: the gradient of the loss with respect to its output, batch on dim 0.
    """
    compute = getattr(layer, FT_COMPUTE_SAMPLE_GRAD_ATTR, None)
    if compute is None:
        prepare_layer(layer)
        compute = getattr(layer, FT_COMPUTE_SAMPLE_GRAD_ATTR)
    if torch.is_tensor(activations):
        activations = [activations]
    activations = [
        a.to(backprops.dtype) if torch.is_tensor(a) and a.is_floating_point() else a
        for a in activations
    ]
    params = list(layer.parameters())
    grads = compute([p.detach() for p in params], activations, backprops)
    return dict(zip(params, grads))


def per_sample_gradient(
    layer: nn.Module, activations, backprops: torch.Tensor, *, batch_first: bool
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``layer``'s trainable parameters, its children's included (the
    hooks' path: frozen parameters are held fixed and get nothing)."""
    named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    if not named:
        return {}
    params = {n: p.detach() for n, p in named}
    per_sample = _per_sample_grads(layer, params, activations, backprops, batch_first)
    return {p: per_sample[n] for n, p in named}

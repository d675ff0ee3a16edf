"""Registries mapping layer types to their per-sample gradient and norm functions.

A grad sampler is a pure function ``(layer, activations, backprops) -> {param: per_sample_grad}``.
``activations`` is the list of the layer's forward inputs and ``backprops`` the gradient of the
loss with respect to the layer's output, both with the batch on dim 0 (the hooks move it there),
and ``backprops`` already rescaled so that each sample's slice is the gradient of that sample's
own loss.  A norm sampler has the same signature and returns ``{param: per_sample_norm}`` of shape
``(batch,)`` without materialising the per-sample gradient (ghost clipping).  A clipped-sum
sampler takes a fourth argument, per-sample weights ``c`` of shape ``(batch,)``, and returns
``{param: sum_i c_i * g_i}`` (shape ``param.shape``), again without the per-sample gradients: with
the clipping coefficients as ``c`` it is the book-keeping step of Bu et al. (2023), "Differentially
private optimization on large model at small cost", which replaces ghost clipping's second
backward pass.
"""

from typing import Callable, Dict, Sequence, Type, Union

import torch
import torch.nn as nn

GRAD_SAMPLERS: Dict[Type[nn.Module], Callable] = {}
NORM_SAMPLERS: Dict[Type[nn.Module], Callable] = {}
CLIPPED_SUM_SAMPLERS: Dict[Type[nn.Module], Callable] = {}


# A grad sampler with this attribute set to True computes ``sum_t b_{i,t} a_{i,t}^T`` over the
# dims between batch and features of a single activation: several calls of its layer can then
# be joined along that dim and contracted once (the hooks do so for RNN time steps).
SUMS_OVER_SEQUENCE_ATTR = "_sums_over_sequence"

# A norm sampler may carry under this attribute a variant for book-keeping norm passes,
# ``(layer, activations, backprops) -> (norms, kept)``: ``norms`` as the sampler's, and ``kept``
# None or ``{param: (B, *param.shape) per-sample gradient}`` for every parameter of ``norms``,
# where materialising them cost less than the ghost norms plus the clipped-sum products.  The
# hooks then keep ``kept`` instead of the activations and backprops, and the clipped sum is
# ``weighted_sums(kept, c)``.
KEEPS_GRADS_ATTR = "_norms_keeping_grads"


def weighted_sums(
    per_sample: Dict[nn.Parameter, torch.Tensor], weights: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """``{param: sum_i weights_i * per_sample[param][i]}``: one matrix-vector product each."""
    return {p: torch.tensordot(weights.to(g.dtype), g, dims=1) for p, g in per_sample.items()}


def _as_classes(target_class_or_classes):
    if isinstance(target_class_or_classes, type):
        return [target_class_or_classes]
    return list(target_class_or_classes)


def _registrar(table: Dict[Type[nn.Module], Callable], target_class_or_classes):
    def decorator(f):
        for cls in _as_classes(target_class_or_classes):
            table[cls] = f
        return f

    return decorator


def register_grad_sampler(
    target_class_or_classes: Union[Type[nn.Module], Sequence[Type[nn.Module]]],
):
    """Decorator: register ``f`` as the per-sample gradient function of the given layer type(s).

    Args:
        target_class_or_classes: the layer class, or a sequence of classes, the decorated function
            computes per-sample gradients for.
    """
    return _registrar(GRAD_SAMPLERS, target_class_or_classes)


def register_norm_sampler(
    target_class_or_classes: Union[Type[nn.Module], Sequence[Type[nn.Module]]],
):
    """Decorator: register ``f`` as the per-sample gradient *norm* function (ghost clipping).

    Args:
        target_class_or_classes: the layer class, or a sequence of classes, the decorated function
            computes per-sample gradient norms for (ghost clipping).
    """
    return _registrar(NORM_SAMPLERS, target_class_or_classes)


def register_clipped_sum_sampler(
    target_class_or_classes: Union[Type[nn.Module], Sequence[Type[nn.Module]]],
):
    """Decorator: register ``f(layer, activations, backprops, weights)`` as the weighted sum of
    per-sample gradients of the given layer type(s) (book-keeping, module docstring)."""
    return _registrar(CLIPPED_SUM_SAMPLERS, target_class_or_classes)

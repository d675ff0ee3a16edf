"""Fast gradient clipping for models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP is data parallel: every rank clips its own samples, and a sample's gradient norm only needs
that rank's activations and output gradients (Li et al. 2022, ghost clipping), never the other
ranks' shards.  Two things differ from the unsharded ``GradSampleModuleFastGradientClipping``:

* ``fully_shard`` swaps each unit's class for a generated ``FSDP<Layer>`` subclass, so samplers are
  looked up by the layer class it was generated from (``_FSDPAwareSamplers``);
* around a unit's forward and backward the module holds gathered (unsharded) parameters, while
  ``model.parameters()`` are the ``DTensor`` shards.  Samplers therefore see full tensors, and
  their results are re-keyed by parameter name onto the shards, which carry ``_norm_sample``.

The norm pass is the unsharded wrapper's: it asks ``torch.autograd.grad`` for the gradients just
below the hooked layers' backward-hook nodes, never for the shards (which are not in the autograd
graph; the gathered copies are), so every hook runs, no weight gradient is computed, and FSDP's
reduce-scatter only runs in the second, clipped pass.  Book-keeping is not used: that pass is
where FSDP reduces the gradients.

Layers without a registered grad sampler (the ``torch.func`` fallback) are not supported once
sharded: registering a sampler for the layer class is the way out (clear error otherwise).
"""

from collections.abc import MutableMapping
from typing import Dict

import torch
import torch.nn as nn

from opacus.grad_sample import registry
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    _in_backward,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.module_utils import requires_grad, trainable_parameters

__all__ = [
    "AbstractGradSampleModule",
    "GradSampleHooksFastGradientClipping",
    "GradSampleHooksFastGradientClippingFSDP",
    "GradSampleModuleFastGradientClippingFSDP",
    "ft_compute_per_sample_gradient",
    "requires_grad",
    "trainable_parameters",
]


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2: no module can be a generated FSDP class
        return None
    return FSDPModule


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def is_fsdp_module(module: nn.Module) -> bool:
    """True if ``fully_shard`` was applied to ``module`` (its class is a generated subclass)."""
    fsdp = _fsdp_module_class()
    return fsdp is not None and isinstance(module, fsdp)


def unwrapped_class(cls: type) -> type:
    """The layer class ``fully_shard`` generated ``cls`` from (``FSDPLinear`` -> ``Linear``)."""
    fsdp = _fsdp_module_class()
    if fsdp is None or not issubclass(cls, fsdp):
        return cls
    for base in cls.__mro__[1:]:
        if issubclass(base, nn.Module) and not issubclass(base, fsdp):
            return base
    return cls


def reject_sharded_parameters(module: nn.Module, wrapper: str) -> None:
    """Raise ``NotImplementedError`` if ``module`` holds ``DTensor`` (sharded) parameters.

    Used by the tensor-parallel wrapper, whose per-sample norms of row/column shards would need
    an all-reduce of squared norms across the mesh (not implemented).
    """
    names = [n for n, p in module.named_parameters() if _is_dtensor(p)]
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise NotImplementedError(
            f"{wrapper}: parameters {shown} are DTensor shards; per-sample norms of sharded "
            "parameters for this wrapper are not implemented. Wrap the unsharded model instead "
            "(or, for FSDP2, use GradSampleModuleFastGradientClippingFSDP)."
        )


class _FSDPAwareSamplers(MutableMapping):
    """Live view of a sampler registry that also answers for generated ``FSDP<Layer>`` classes."""

    def __init__(self, base: Dict[type, object]):
        self._base = base

    def __getitem__(self, cls):
        if cls in self._base:
            return self._base[cls]
        return self._base[unwrapped_class(cls)]

    def __setitem__(self, cls, fn):
        self._base[cls] = fn

    def __delitem__(self, cls):
        del self._base[cls]

    def __iter__(self):
        return iter(self._base)

    def __len__(self):
        return len(self._base)

    def __contains__(self, cls):
        return cls in self._base or unwrapped_class(cls) in self._base


class GradSampleHooksFastGradientClippingFSDP(GradSampleHooksFastGradientClipping):
    """Ghost-clipping hooks for FSDP2-sharded (or unsharded) models: see the module docstring.

    ``p._norm_sample`` is stored on the parameters of ``model.parameters()`` (the ``DTensor``
    shards), so ``get_norm_sample()`` and ``get_clipping_coef()`` give this rank's ``(batch,)``
    per-sample norms over the *full* parameters.

    Args:
        m: the model to wrap.
        batch_first: True if the batch is dimension 0 of every layer's input and output, False for
            dimension 1.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch (per-sample
            gradients are rescaled for ``"mean"``).
        strict: raise if a layer's per-sample gradients cannot be computed (False: such layers are
            left without hooks).
        max_grad_norm: the clipping bound ``C`` used by ``get_clipping_coef``.
    """

    GRAD_SAMPLERS = _FSDPAwareSamplers(registry.GRAD_SAMPLERS)
    NORM_SAMPLERS = _FSDPAwareSamplers(registry.NORM_SAMPLERS)
    _can_book_keep = False  # the second pass is where FSDP reduce-scatters the gradients
    # Norms are re-keyed onto the shards: a tied weight keeps the materialised path.
    _ghost_tied_pairs = False
    # FSDP swaps the registered parameters (shards / gathered tensors) around each forward.
    _parameters_fixed = False

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction="mean",
        strict: bool = True,
        max_grad_norm=1,
    ):
        self._init_fsdp(m, batch_first, loss_reduction, strict, False, max_grad_norm, True)

    def _init_fsdp(
        self, m, batch_first, loss_reduction, strict, force_functorch, max_grad_norm, ghost
    ):
        # DTensors that no FSDP unit owns (tensor parallelism, hand-made shards) would reach the
        # samplers as shards: only fully_shard gathers them around forward and backward.
        foreign = [
            f"{prefix}.{n}" if prefix else n
            for prefix, sub in m.named_modules()
            if not is_fsdp_module(sub)
            for n, p in sub.named_parameters(recurse=False)
            if _is_dtensor(p)
        ]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise NotImplementedError(
                f"{type(self).__name__}: parameters {shown} are DTensor shards of a module that "
                "is not an FSDP2 unit; only parameters sharded by fully_shard (gathered around "
                "each layer's forward and backward) are supported. Shard the model with "
                "opacus.utils.fsdp_utils.FSDP2Wrapper, or wrap the unsharded model"
            )
        sharded = [n for n, p in m.named_parameters() if _is_dtensor(p)]
        if force_functorch and sharded:
            raise NotImplementedError(
                f"{type(self).__name__}: force_functorch=True is not supported for FSDP-sharded "
                f"parameters ({', '.join(sharded[:3])}, ...): the torch.func fallback would need "
                "every shard gathered; use the registered grad/norm samplers (the default)"
            )
        GradSampleHooksFastGradientClipping.__init__(
            self,
            m,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            strict=strict,
            force_functorch=force_functorch,
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=ghost,
        )
        # Parameters as registered now (the shards, between forward passes), by name per layer.
        self._slots = {
            module: dict(module.named_parameters(recurse=self._samplers[module] is not None))
            for module in self._samplers
        }

    # ------------------------------------------------------------ parameter identity
    def _to_slots(self, module: nn.Module, per_param: Dict) -> Dict:
        """Re-key a sampler's ``{param: tensor}`` from the gathered tensors onto the shards."""
        slots = self._slots.get(module)
        if not slots:
            return per_param
        current = {id(p): n for n, p in module.named_parameters()}
        out = {}
        for p, value in per_param.items():
            name = current.get(id(p))
            out[slots[name] if name in slots else p] = value
        return out

    # ------------------------------------------------------------------------ hooks
    def _start_forward(self, module: nn.Module, _inputs) -> None:
        super()._start_forward(module, _inputs)
        if self.hooks_enabled and not _in_backward():
            for slots in self._slots.values():
                for p in slots.values():
                    if hasattr(p, "_norm_sample"):
                        del p._norm_sample

    def _fallback_unsupported(self, module: nn.Module) -> bool:
        return self._samplers.get(module) is None and any(
            _is_dtensor(p) for p in self._slots.get(module, {}).values()
        )

    def _raise_fallback(self, module: nn.Module):
        raise NotImplementedError(
            f"layer '{self._module_names.get(module, '?')}' "
            f"({unwrapped_class(type(module)).__name__}) is FSDP-sharded and has no registered "
            "grad sampler: the torch.func fallback is not supported for sharded parameters. "
            "Register one with opacus.grad_sample.register_grad_sampler (and "
            "register_norm_sampler for ghost norms), or keep the layer out of fully_shard"
        )

    def _probe_batch_mixing(self, module: nn.Module, activations: list, output) -> None:
        if self._fallback_unsupported(module):
            self._raise_fallback(module)
        super()._probe_batch_mixing(module, activations, output)

    def _per_sample_grads(self, module: nn.Module, activations, backprops):
        if self._fallback_unsupported(module):
            self._raise_fallback(module)
        return self._to_slots(module, super()._per_sample_grads(module, activations, backprops))

    def _norms(self, module: nn.Module, norm_sampler, activations, backprops) -> Dict:
        return self._to_slots(module, norm_sampler(module, activations, backprops))

    def get_norm_sample(self) -> torch.Tensor:
        """This rank's per-sample total gradient norm over all (full) parameters, ``(batch,)``.

        Returns:
            the per-sample gradient norms, shape ``(batch,)``.
        """
        return super().get_norm_sample()


class GradSampleModuleFastGradientClippingFSDP(
    GradSampleHooksFastGradientClippingFSDP, AbstractGradSampleModule
):
    """``nn.Module`` wrapper for ``GradSampleHooksFastGradientClippingFSDP``.

    Wrap the model after ``opacus.utils.fsdp_utils.FSDP2Wrapper`` (one FSDP unit per layer with
    trainable parameters); use ``FSDPOptimizerFastGradientClipping`` and
    ``DPLossFastGradientClipping`` with it.

    Args:
        m: the model to wrap.
        batch_first: True if the batch is dimension 0 of every layer's input and output, False for
            dimension 1.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the batch (per-sample
            gradients are rescaled for ``"mean"``).
        strict: raise if a layer's per-sample gradients cannot be computed (False: such layers are
            left without hooks).
        force_functorch: compute every per-sample gradient with ``torch.func`` instead of the
            layer's grad sampler.
        max_grad_norm: the clipping bound ``C`` used by ``get_clipping_coef``.
        use_ghost_clipping: use the registered norm samplers (ghost norms); False takes every norm
            from materialised per-sample gradients.
    """

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction="mean",
        strict: bool = True,
        force_functorch=False,
        max_grad_norm=1,
        use_ghost_clipping: bool = True,
    ):
        AbstractGradSampleModule.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction
        )
        self._init_fsdp(
            m,
            batch_first,
            loss_reduction,
            strict,
            force_functorch,
            max_grad_norm,
            use_ghost_clipping,
        )

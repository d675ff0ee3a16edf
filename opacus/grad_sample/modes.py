"""The grad-sample modes in one table: what each ``grad_sample_mode`` builds and what it needs.

``PrivacyEngine.make_private``, ``prepare_module``/``wrap_model``, ``get_gsm_class`` and
``get_hooks_class`` read this table instead of comparing mode strings, so a new mode is one new
row here and one in its optimizer side, ``opacus.optimizers.families.OPTIMIZER_FAMILIES`` (which
optimizer family the mode needs; the optimizer factory ``get_optimizer_class`` reads only that
one, so the optimizers never import this package). Each row here reads its optimizer facts
(``per_sample``, ``clippings``, ``fsdp``, ``grad_sample_before_grad``) from there.

Two ways of getting per-sample information exist (DESIGN: the first of the three axes):

* ``"per_sample_gradients"``: the hooks (or expanded weights) materialise ``p.grad_sample``;
  the optimizer clips and sums them (``DPOptimizer`` and its clipping variants).
* ``"clipped_sum"``: ghost clipping (Li et al. 2022). The hooks only compute per-sample norms; a
  second backward pass, run by the DP criterion ``make_private`` returns, leaves the clipped sum
  in ``p.grad``; the optimizer noises it (``DPOptimizerFastGradientClipping`` and variants).
  The hooks need ``max_grad_norm`` themselves, and only flat clipping exists.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Type

from opacus.grad_sample.grad_sample_module import GradSampleHooks, GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
    GradSampleHooksFastGradientClippingFSDP,
    GradSampleModuleFastGradientClippingFSDP,
)
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_tp import (
    GradSampleHooksFastGradientClippingTP,
    GradSampleModuleFastGradientClippingTP,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights
from opacus.grad_sample.gsm_no_op import GradSampleHooksNoOp, GradSampleModuleNoOp
from opacus.optimizers.families import (
    CLIPPED_SUM,
    OPTIMIZER_FAMILIES,
    PER_SAMPLE_GRADIENTS,
    OptimizerFamily,
    unknown_mode_error,
)

__all__ = [
    "CLIPPED_SUM",
    "GRAD_SAMPLE_MODES",
    "GradSampleMode",
    "LOSS_REDUCTIONS",
    "PER_SAMPLE_GRADIENTS",
    "grad_sample_mode_info",
    "validate_loss_reduction",
]

#: The reductions of the loss ``backward`` is called on that per-sample gradients support.
LOSS_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class GradSampleMode:
    """One ``grad_sample_mode``: the classes it builds and what ``make_private`` does with it.

    Attributes:
        name: the ``grad_sample_mode`` string.
        module_class: the ``nn.Module`` wrapper (``wrap_model=True``).
        hooks_class: the hooks-only class (``wrap_model=False``: the model keeps its identity);
            ``None`` if the mode has none.
        force_functorch: build every per-sample gradient with ``torch.func`` (no layer samplers).
        returns_criterion: ``make_private`` returns ``(module, optimizer, criterion,
            data_loader)``, ``criterion`` a ``DPLossFastGradientClipping`` running the clipped
            second backward pass; otherwise ``(module, optimizer, data_loader)``.
        hooks_take_max_grad_norm: the hooks clip, so they are built with ``max_grad_norm``.
        skips_batch_gradient: under ``PrivacyEngine`` (no data parallelism) the hooks may skip the
            discarded non-private batch gradient (``compute_batch_gradients = False``).

    The optimizer facts of the mode are its row of ``OPTIMIZER_FAMILIES`` (``optimizer``), also
    readable here: ``per_sample`` (``PER_SAMPLE_GRADIENTS`` or ``CLIPPED_SUM``), ``clippings``
    (the ``clipping`` values ``make_private`` accepts), ``fsdp``, ``grad_sample_before_grad``
    and ``clips_in_backward``.
    """

    name: str
    module_class: Type[AbstractGradSampleModule]
    hooks_class: Optional[type]
    force_functorch: bool = False
    returns_criterion: bool = False
    hooks_take_max_grad_norm: bool = False
    skips_batch_gradient: bool = False

    def __post_init__(self):
        if self.name not in OPTIMIZER_FAMILIES:
            raise ValueError(
                f"grad_sample_mode {self.name!r} has no row in "
                "opacus.optimizers.families.OPTIMIZER_FAMILIES: add its optimizer family there"
            )

    @property
    def optimizer(self) -> OptimizerFamily:
        """The mode's optimizer family (``opacus.optimizers.families``)."""
        return OPTIMIZER_FAMILIES[self.name]

    @property
    def per_sample(self) -> str:
        """``PER_SAMPLE_GRADIENTS`` or ``CLIPPED_SUM``: selects the optimizer family."""
        return self.optimizer.per_sample

    @property
    def clippings(self) -> Tuple[str, ...]:
        """The ``clipping`` values ``make_private`` accepts with this mode."""
        return self.optimizer.clippings

    @property
    def fsdp(self) -> bool:
        """Parameters may be FSDP shards; the optimizer reads the gradient shard FSDP reduced."""
        return self.optimizer.fsdp

    @property
    def grad_sample_before_grad(self) -> bool:
        """Each ``p.grad_sample`` is complete before ``p.grad`` is accumulated (per-layer
        clipping with DDP can run in gradient hooks during backward)."""
        return self.optimizer.grad_sample_before_grad

    @property
    def clips_in_backward(self) -> bool:
        """True for ghost clipping: ``p.grad`` holds the clipped sum after the DP criterion."""
        return self.optimizer.clips_in_backward

    def hook_kwargs(self, *, max_grad_norm) -> dict:
        """What ``make_private`` adds to the hooks' constructor (``prepare_module`` adds
        ``force_functorch`` itself): ghost clipping's hooks clip with ``max_grad_norm``."""
        if self.hooks_take_max_grad_norm:
            return {"max_grad_norm": max_grad_norm}
        return {}


_GHOST = dict(returns_criterion=True, hooks_take_max_grad_norm=True)

#: Every ``grad_sample_mode``, keyed by name.
GRAD_SAMPLE_MODES: Dict[str, GradSampleMode] = {
    m.name: m
    for m in (
        GradSampleMode(
            "hooks",
            GradSampleModule,
            GradSampleHooks,
            skips_batch_gradient=True,
        ),
        GradSampleMode(
            "functorch",
            GradSampleModule,
            GradSampleHooks,
            force_functorch=True,
            skips_batch_gradient=True,
        ),
        GradSampleMode("ew", GradSampleModuleExpandedWeights, None),
        GradSampleMode(
            "ghost",
            GradSampleModuleFastGradientClipping,
            GradSampleHooksFastGradientClipping,
            **_GHOST,
        ),
        GradSampleMode(
            "ghost_fsdp",
            GradSampleModuleFastGradientClippingFSDP,
            GradSampleHooksFastGradientClippingFSDP,
            **_GHOST,
        ),
        GradSampleMode(
            "ghost_tp",
            GradSampleModuleFastGradientClippingTP,
            GradSampleHooksFastGradientClippingTP,
            **_GHOST,
        ),
        GradSampleMode("no_op", GradSampleModuleNoOp, GradSampleHooksNoOp),
    )
}


def grad_sample_mode_info(grad_sample_mode: Optional[str]) -> GradSampleMode:
    """The table row of ``grad_sample_mode`` (``None`` means ``"hooks"``).

    Raises ``ValueError`` naming the mode and the known ones if it is not in the table.
    """
    if grad_sample_mode is None:
        grad_sample_mode = "hooks"
    try:
        return GRAD_SAMPLE_MODES[grad_sample_mode]
    except (KeyError, TypeError):
        raise unknown_mode_error(grad_sample_mode, GRAD_SAMPLE_MODES) from None


def validate_loss_reduction(loss_reduction, where: str) -> str:
    """Return ``loss_reduction`` if it is ``"mean"`` or ``"sum"``, else raise ``ValueError``.

    ``where`` names the caller (e.g. ``"PrivacyEngine.make_private"``) in the message.
    """
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(
            f"{where}: loss_reduction={loss_reduction!r} is not supported; use 'mean' or 'sum', "
            "the reduction of the loss you call backward on"
        )
    return loss_reduction

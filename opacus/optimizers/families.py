"""Which DP optimizer family each ``grad_sample_mode`` needs: the optimizer's side of the modes
table, read by ``get_optimizer_class``.

Two ways of getting per-sample information exist (DESIGN: the first of the three axes), and
each has its own optimizer family:

* ``PER_SAMPLE_GRADIENTS``: the hooks (or expanded weights) materialise ``p.grad_sample``; the
  optimizer clips and sums them (``DPOptimizer`` and its clipping variants: any ``clipping``).
* ``CLIPPED_SUM``: ghost clipping (Li et al. 2022). A second backward pass, run by the DP
  criterion ``make_private`` returns, leaves the clipped sum in ``p.grad``; the optimizer only
  noises it (``DPOptimizerFastGradientClipping`` and variants: flat clipping only).

The grad-sample side of each mode (the hooks and module classes, what ``make_private``
returns) is ``opacus.grad_sample.modes``, whose rows read theirs from this table; this package
never imports ``opacus.grad_sample`` (whose ghost hooks use ``optimizers.clipping``).
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = [
    "CLIPPED_SUM",
    "OPTIMIZER_FAMILIES",
    "OptimizerFamily",
    "PER_SAMPLE_GRADIENTS",
    "optimizer_family",
    "unknown_mode_error",
]

PER_SAMPLE_GRADIENTS = "per_sample_gradients"
CLIPPED_SUM = "clipped_sum"


@dataclass(frozen=True)
class OptimizerFamily:
    """What the optimizer of one ``grad_sample_mode`` receives and supports.

    Attributes:
        per_sample: ``PER_SAMPLE_GRADIENTS`` or ``CLIPPED_SUM`` (module docstring).
        clippings: the ``clipping`` values the mode supports.
        fsdp: parameters may be FSDP shards; the optimizer reads the gradient shard FSDP reduced
            (``FSDPOptimizerFastGradientClipping``).
        grad_sample_before_grad: each ``p.grad_sample`` is complete before ``p.grad`` is
            accumulated, so per-layer clipping with DDP can run in gradient hooks during backward
            (``DistributedPerLayerOptimizer``); otherwise it runs at step.
    """

    per_sample: str
    clippings: Tuple[str, ...]
    fsdp: bool = False
    grad_sample_before_grad: bool = False

    @property
    def clips_in_backward(self) -> bool:
        """True for ghost clipping: ``p.grad`` holds the clipped sum after the DP criterion."""
        return self.per_sample == CLIPPED_SUM


_ALL_CLIPPINGS = ("flat", "per_layer", "adaptive")
_PER_SAMPLE = OptimizerFamily(PER_SAMPLE_GRADIENTS, _ALL_CLIPPINGS)
_GHOST = OptimizerFamily(CLIPPED_SUM, ("flat",))

#: The optimizer family of every ``grad_sample_mode``, keyed by mode name (the same names as
#: ``opacus.grad_sample.modes.GRAD_SAMPLE_MODES``).
OPTIMIZER_FAMILIES: Dict[str, OptimizerFamily] = {
    "hooks": OptimizerFamily(PER_SAMPLE_GRADIENTS, _ALL_CLIPPINGS, grad_sample_before_grad=True),
    "functorch": _PER_SAMPLE,
    "ew": _PER_SAMPLE,
    "ghost": _GHOST,
    "ghost_fsdp": OptimizerFamily(CLIPPED_SUM, ("flat",), fsdp=True),
    "ghost_tp": _GHOST,
    "no_op": _PER_SAMPLE,
}


def unknown_mode_error(grad_sample_mode, known) -> ValueError:
    """The error for a ``grad_sample_mode`` missing from the modes table (``known``: its names)."""
    return ValueError(
        f"grad_sample_mode={grad_sample_mode!r} is not a grad-sample mode; choose one of "
        f"{sorted(known)}"
    )


def optimizer_family(grad_sample_mode: Optional[str]) -> OptimizerFamily:
    """The optimizer family of ``grad_sample_mode`` (``None`` means ``"hooks"``).

    Args:
        grad_sample_mode: the mode name.

    Returns:
        its row of ``OPTIMIZER_FAMILIES``.

    Raises:
        ValueError: the mode is not in the table (the message names the known ones).
    """
    if grad_sample_mode is None:
        grad_sample_mode = "hooks"
    try:
        return OPTIMIZER_FAMILIES[grad_sample_mode]
    except (KeyError, TypeError):
        raise unknown_mode_error(grad_sample_mode, OPTIMIZER_FAMILIES) from None

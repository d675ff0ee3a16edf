"""DP optimizers: clip (optimizers/clipping) -> sum -> noise (optimizers/noise) -> step.

``get_optimizer_class(clipping, distributed, grad_sample_mode)`` picks the public class for one
point of the three axes: how per-sample information is obtained (``grad_sample_mode``: ghost
clipping reads clipped sums, the other modes per-sample gradients), how it is clipped
(``clipping``) and where the sum lives (``distributed``).
"""

from opacus.optimizers.adaclipoptimizer import AdaClipDPOptimizer
from opacus.optimizers.ddp_perlayeroptimizer import (
    DistributedPerLayerOptimizer,
    SimpleDistributedPerLayerOptimizer,
)
from opacus.optimizers.ddpoptimizer import DistributedDPOptimizer
from opacus.optimizers.ddpoptimizer_fast_gradient_clipping import (
    DistributedDPOptimizerFastGradientClipping,
)
from opacus.optimizers.fsdpoptimizer_fast_gradient_clipping import (
    FSDPOptimizerFastGradientClipping,
)
from opacus.optimizers.optimizer import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.optimizers.perlayeroptimizer import DPPerLayerOptimizer

__all__ = [
    "AdaClipDPOptimizer",
    "DistributedPerLayerOptimizer",
    "DistributedDPOptimizer",
    "DPOptimizer",
    "DPOptimizerFastGradientClipping",
    "DistributedDPOptimizerFastGradientClipping",
    "FSDPOptimizerFastGradientClipping",
    "DPPerLayerOptimizer",
    "SimpleDistributedPerLayerOptimizer",
    "get_optimizer_class",
]

_GHOST_MODES = ("ghost", "ghost_fsdp")


def get_optimizer_class(clipping: str, distributed: bool, grad_sample_mode: str = None):
    """The DP optimizer class for ``clipping`` ("flat", "per_layer", "adaptive"),
    ``distributed`` and ``grad_sample_mode`` ("hooks", "functorch", "ew", "ghost", ...).

    Ghost clipping ("ghost", "ghost_fsdp") supports only flat clipping.  Per-layer clipping with
    DDP clips during backward when the per-sample gradients come from hooks
    (``DistributedPerLayerOptimizer``), otherwise at step (``SimpleDistributedPerLayerOptimizer``).
    Adaptive clipping is not available with ``distributed=True``.
    """
    if grad_sample_mode in _GHOST_MODES:
        if clipping != "flat":
            raise ValueError(
                f"grad_sample_mode={grad_sample_mode!r} (ghost clipping) supports only "
                f"clipping='flat', got clipping={clipping!r}; use grad_sample_mode='hooks' for "
                "per-layer or adaptive clipping"
            )
        if grad_sample_mode == "ghost_fsdp":
            return FSDPOptimizerFastGradientClipping
        return (
            DistributedDPOptimizerFastGradientClipping
            if distributed
            else (DPOptimizerFastGradientClipping)
        )
    if clipping == "flat":
        return DistributedDPOptimizer if distributed else DPOptimizer
    if clipping == "per_layer":
        if not distributed:
            return DPPerLayerOptimizer
        if grad_sample_mode == "hooks":
            return DistributedPerLayerOptimizer
        return SimpleDistributedPerLayerOptimizer
    if clipping == "adaptive":
        if distributed:
            raise ValueError(
                "clipping='adaptive' is not supported with distributed=True; use clipping='flat' "
                "or 'per_layer' for distributed training"
            )
        return AdaClipDPOptimizer
    raise ValueError(
        f"unexpected clipping={clipping!r} (distributed={distributed}, grad_sample_mode="
        f"{grad_sample_mode!r}): use 'flat', 'per_layer' or 'adaptive'"
    )

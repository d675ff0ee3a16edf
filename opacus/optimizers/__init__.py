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
from opacus.optimizers.families import optimizer_family
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


def get_optimizer_class(clipping: str, distributed: bool, grad_sample_mode: str = None):
    """The DP optimizer class for ``clipping`` ("flat", "per_layer", "adaptive"),
    ``distributed`` and ``grad_sample_mode`` ("hooks", "functorch", "ew", "ghost", ...).

    The mode's row in ``opacus.optimizers.families`` (the optimizer's side of the modes table
    ``opacus.grad_sample.modes``) says how per-sample information arrives:
    per-sample gradients (clipped here, any ``clipping``) or, for ghost clipping, a clipped sum
    in ``p.grad`` (flat clipping only; FSDP shards get ``FSDPOptimizerFastGradientClipping``).
    Per-layer clipping with DDP clips during backward when the per-sample gradients come from
    hooks (``DistributedPerLayerOptimizer``), otherwise at step
    (``SimpleDistributedPerLayerOptimizer``). Adaptive clipping is not available with
    ``distributed=True``.
    """
    mode = optimizer_family(grad_sample_mode)
    if clipping not in mode.clippings:
        name = "hooks" if grad_sample_mode is None else grad_sample_mode
        raise ValueError(
            f"unexpected clipping={clipping!r} for grad_sample_mode={name!r} "
            f"(distributed={distributed}): use one of {list(mode.clippings)}"
            + (
                "; use grad_sample_mode='hooks' for per-layer or adaptive clipping"
                if mode.clips_in_backward
                else ""
            )
        )
    if mode.clips_in_backward:
        if mode.fsdp:
            return FSDPOptimizerFastGradientClipping
        if distributed:
            return DistributedDPOptimizerFastGradientClipping
        return DPOptimizerFastGradientClipping
    if clipping == "flat":
        return DistributedDPOptimizer if distributed else DPOptimizer
    if clipping == "per_layer":
        if not distributed:
            return DPPerLayerOptimizer
        if mode.grad_sample_before_grad:
            return DistributedPerLayerOptimizer
        return SimpleDistributedPerLayerOptimizer
    # clipping == "adaptive"
    if distributed:
        raise ValueError(
            "clipping='adaptive' is not supported with distributed=True; use clipping='flat' "
            "or 'per_layer' for distributed training"
        )
    return AdaClipDPOptimizer

"""Ghost clipping's loss side, at its Opacus 1.6 path: see ``opacus.grad_sample.ghost_loss``."""

from opacus.grad_sample.ghost_loss import (
    ClippedSumHooks,
    ClippedSumOptimizer,
    DPLossFastGradientClipping,
    DPTensorFastGradientClipping,
    double_backward,
    per_sample_loss,
)
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping

__all__ = [
    "ClippedSumHooks",
    "ClippedSumOptimizer",
    "DPLossFastGradientClipping",
    "DPOptimizerFastGradientClipping",
    "DPTensorFastGradientClipping",
    "GradSampleHooksFastGradientClipping",
    "GradSampleModuleFastGradientClipping",
    "double_backward",
    "per_sample_loss",
]

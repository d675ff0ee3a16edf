"""Schedules for the DP optimizer's noise multiplier and clip bound (like torch's LR schedulers)."""

from opacus.schedulers.grad_clip_scheduler import (
    ExponentialGradClip,
    LambdaGradClip,
    StepGradClip,
    _GradClipScheduler,
)
from opacus.schedulers.noise_scheduler import (
    ExponentialNoise,
    LambdaNoise,
    StepNoise,
    _NoiseScheduler,
)

__all__ = [
    "ExponentialGradClip",
    "LambdaGradClip",
    "StepGradClip",
    "_GradClipScheduler",
    "ExponentialNoise",
    "LambdaNoise",
    "StepNoise",
    "_NoiseScheduler",
]

"""Utilities: Poisson samplers, virtual batches, module walking, tensor and clipping helpers."""

"""Utilities: Poisson samplers, virtual batches, module walking, tensor helpers, clipping helpers."""

"""Deliberately broken DP-SGD, for checking that an audit catches privacy bugs.

Each class is a mixin placed before a DP optimizer's class (``engine_with`` does so on the
optimizer that ``PrivacyEngine.make_private`` returns).  All but ``SwappedSamples`` break the
guarantee the accountant reports, so a sound, powerful enough audit must find
``eps_lower > eps_claimed``; ``SwappedSamples`` is harmless (the clipped sum does not depend on
the order of the samples) and must not be flagged.  Never train with them.

Not part of the installed ``opacus`` package (nothing privacy-breaking ships with it): used by
``examples/audit_dp_sgd.py`` (next to this file) and by the tests (``tests/auditing/sabotage.py``
loads this file).
"""

from typing import Callable, Optional

import torch

from opacus.privacy_engine import PrivacyEngine

__all__ = ["MixedSamples", "NoClipping", "QuietNoise", "SwappedSamples", "engine_with"]


class NoClipping:
    """Sums the raw per-sample gradients into ``summed_grad``: no clipping at all."""

    def clip_and_accumulate(self):
        """Sum the per-sample gradients unclipped."""
        for p, g in zip(self.params, self.grad_samples):
            s = g.sum(0)
            p.summed_grad = s if getattr(p, "summed_grad", None) is None else p.summed_grad + s


class QuietNoise:
    """Claims ``noise_multiplier`` (the accountant reads it) but adds a tenth of the noise."""

    def add_noise(self):
        """Add a tenth of the claimed noise."""
        claimed = self.noise_multiplier
        self.noise_multiplier = claimed / 10
        try:
            super().add_noise()
        finally:
            self.noise_multiplier = claimed


class MixedSamples:
    """Per-sample gradient ``i`` also holds sample ``i - 1``'s (a batch-dimension mix-up, like
    feeding sequence-first activations to a batch-first grad sampler)."""

    def clip_and_accumulate(self):
        """Mix each sample's gradient with its neighbour's, then clip as usual."""
        for p in self.params:
            p.grad_sample = p.grad_sample + p.grad_sample.roll(1, dims=0)
        super().clip_and_accumulate()


class SwappedSamples:
    """Swaps the first two samples' per-sample gradients, in every parameter alike: NOT a
    privacy bug, since the clipped sum is invariant under a permutation of the samples."""

    def clip_and_accumulate(self):
        """Swap the first two samples' gradients, then clip as usual."""
        for p in self.params:
            g = p.grad_sample
            if g.shape[0] >= 2:
                p.grad_sample = torch.cat([g[1:2], g[0:1], g[2:]])
        super().clip_and_accumulate()


def engine_with(
    sabotage: Optional[type] = None, accountant: str = "prv"
) -> Callable[[], PrivacyEngine]:
    """A ``PrivacyEngine`` factory whose ``make_private`` optimizer runs ``sabotage`` first
    (``None``: the correct engine); pass it as an audit's ``privacy_engine_factory``."""

    class Engine(PrivacyEngine):
        def make_private(self, **kwargs):
            """``PrivacyEngine.make_private``, then the sabotage mixed into the optimizer."""
            made = super().make_private(**kwargs)
            if sabotage is not None:
                opt = made[1]
                opt.__class__ = type(sabotage.__name__, (sabotage, type(opt)), {})
            return made

    return lambda: Engine(accountant=accountant)

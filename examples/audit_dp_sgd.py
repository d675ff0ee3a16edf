#!/usr/bin/env python
"""Audit PrivacyEngine's DP-SGD: an empirical lower bound on eps against the accountant's claim.

Trains a tiny linear model on random data with ``PrivacyEngine.make_private``, inserting Dirac
gradient canaries (``opacus.auditing``), and reports ``eps_lower`` (a statistical lower bound at
``--confidence``) next to ``eps_claimed`` (the PRV accountant). A correct library must give
``eps_lower <= eps_claimed``. ``--sabotage`` breaks one stage of the optimizer on purpose to show
the audit catching it:

* ``no-clip``: per-sample gradients are summed without clipping;
* ``quiet-noise``: the accountant is told ``--noise-multiplier`` but a tenth of it is added;
* ``mixed``: per-sample gradient ``i`` also contains sample ``i-1``'s (a batch-dimension mix-up);
  this doubles the sensitivity only, so audit it at a large delta, e.g.
  ``--sabotage mixed --noise-multiplier 1 --delta 1e-2 --samples 1024 --trials 4000``.

Two analyses: the classical threshold audit over ``--trials`` membership trials
(``--canaries-per-run`` of them per training run), and the one-run audit of Steinke et al. (2023)
with ``--num-canaries`` canaries in a single run. Ends with one summary line per analysis.
"""

import argparse
import os
import sys
import time

import torch
from torch import nn

from opacus.auditing import audit_dp_sgd, audit_dp_sgd_one_run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Deliberately broken DP-SGD (not shipped in the opacus package), next to this script.
from sabotage import MixedSamples, NoClipping, QuietNoise, engine_with  # noqa: E402

SABOTAGE = {"none": None, "no-clip": NoClipping, "quiet-noise": QuietNoise, "mixed": MixedSamples}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sabotage", choices=sorted(SABOTAGE), default="none")
    parser.add_argument("--noise-multiplier", type=float, default=2.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--samples", type=int, default=64, help="dataset size")
    parser.add_argument("--batch-size", type=int, default=None, help="default: full batch")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--canaries-per-run", type=int, default=100)
    parser.add_argument("--num-canaries", type=int, default=1000, help="one-run audit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.samples, 4, generator=g)
    data = (x, torch.randint(0, 2, (args.samples,), generator=g))
    engine_kwargs = dict(noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm)
    common = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        delta=args.delta,
        confidence=args.confidence,
        privacy_engine_factory=engine_with(SABOTAGE[args.sabotage]),
        seed=args.seed,
    )

    def model_fn():
        return nn.Linear(4, 2)

    start = time.time()
    classical = audit_dp_sgd(
        model_fn,
        data,
        engine_kwargs,
        trials=args.trials,
        canaries_per_run=args.canaries_per_run,
        **common,
    )
    one_run = audit_dp_sgd_one_run(
        model_fn, data, engine_kwargs, num_canaries=args.num_canaries, **common
    )
    print(f"sabotage={args.sabotage} ({time.time() - start:.1f}s)")
    print("classical:", classical.summary())
    print("one-run:  ", one_run.summary())
    caught = classical.eps_lower > classical.eps_claimed or one_run.eps_lower > one_run.eps_claimed
    print(
        f"RESULT: eps_lower {max(classical.eps_lower, one_run.eps_lower):.3f} vs eps_claimed "
        f"{classical.eps_claimed:.3f} (sabotage={args.sabotage}): "
        + ("VIOLATION, the run is broken" if caught else "consistent with the claim")
    )


if __name__ == "__main__":
    main()

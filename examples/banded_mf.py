#!/usr/bin/env python
"""Banded matrix-factorization (correlated) noise on the digits CNN, optionally against DP-SGD.

``make_private_with_epsilon(..., noise_mechanism="banded_mf", bands=b)`` replaces DP-SGD's
independent noise by noise correlated across ``b`` steps (``opacus.optimizers.correlated_noise``)
and the data loader by cyclic Poisson sampling (the data split into ``b`` groups, step ``t``
sampling group ``t mod b``). The privacy is that of DP-SGD with ``ceil(T / b)`` steps at the
per-group rate, which the accountant records and ``get_epsilon`` reports. ``--compare`` also
trains DP-SGD at the same (eps, delta), steps and batch size. Ends with a ``RESULT:`` line.
"""

import math
import os
import sys
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as common  # noqa: E402 (the examples' shared helpers, next to this script)
from digits import load_digits_tensors, make_model  # noqa: E402


def parse_args(argv=None):
    p = common.make_parser(__doc__)
    p.add_argument("--bands", type=int, default=4, help="b: bands of C and sampling groups")
    p.add_argument(
        "--coefficients",
        default="sqrt",
        choices=["sqrt", "optimized"],
        help="banded square root, or optimised for the run's number of steps",
    )
    p.add_argument("--target-epsilon", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="expected batch size")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--compare", action="store_true", help="also train DP-SGD (bands=1)")
    common.add_run_args(p)
    return p.parse_args(argv)


def train(args, bands, train_set, test_set):
    """Train the digits CNN privately; ``bands=1`` is plain DP-SGD. Returns a result dict."""
    from opacus import PrivacyEngine
    from opacus.accountants import RDPAccountant

    torch.manual_seed(args.seed)
    model = make_model("digits")
    loader = DataLoader(
        train_set, batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed)
    )
    engine = PrivacyEngine(accountant="rdp")
    kwargs = {}
    if bands > 1:
        kwargs = dict(
            noise_mechanism="banded_mf", bands=bands, noise_coefficients=args.coefficients
        )
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=args.lr),
        data_loader=loader,
        target_epsilon=args.target_epsilon,
        target_delta=args.delta,
        epochs=args.epochs,
        max_grad_norm=args.max_grad_norm,
        **kwargs,
    )
    criterion = nn.CrossEntropyLoss()
    steps, start = 0, time.time()
    for epoch in range(1, args.epochs + 1):
        stats, steps = common.train_epoch(
            model,
            optimizer,
            criterion,
            loader,
            desc=f"b={bands} epoch {epoch}/{args.epochs}",
            show_bar=common.bars_enabled(args),
            eps=float("nan"),
            steps=steps,
            max_steps=args.max_steps,
        )
        if common.out_of_steps(steps, args.max_steps):
            break
    eps = engine.get_epsilon(args.delta)
    # The reduction, checked against a fresh accountant: ceil(T / b) DP-SGD steps at rate q.
    reduced = RDPAccountant()
    reduced.history = [(optimizer.noise_multiplier, loader.sample_rate, math.ceil(steps / bands))]
    return dict(
        bands=bands,
        accuracy=common.evaluate(model, DataLoader(test_set, batch_size=512)),
        eps=eps,
        eps_reduced=reduced.get_epsilon(args.delta),
        sigma=optimizer.noise_multiplier,
        rate=loader.sample_rate,
        steps=steps,
        seconds=time.time() - start,
        mechanism=getattr(optimizer, "noise_mechanism", None),
    )


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args)
    train_set, test_set = load_digits_tensors(0)
    results = [train(args, args.bands, train_set, test_set)]
    if args.compare and args.bands != 1:
        results.append(train(args, 1, train_set, test_set))
    for r in results:
        name = "DP-SGD" if r["bands"] == 1 else f"banded MF b={r['bands']} ({r['mechanism']})"
        print(
            f"{name}: test accuracy {r['accuracy']:.3f}, sigma {r['sigma']:.3f}, sample rate "
            f"{r['rate']:.4f}, {r['steps']} steps, eps {r['eps']:.3f} (reduced DP-SGD: "
            f"{r['eps_reduced']:.3f}), {r['seconds']:.1f}s"
        )
    r = results[0]
    line = (
        f"RESULT: test accuracy {r['accuracy']:.3f} at eps {r['eps']:.2f}, delta {args.delta}, "
        f"bands {r['bands']}, sigma {r['sigma']:.3f}, reduced eps {r['eps_reduced']:.2f}"
    )
    if len(results) > 1:
        line += f", DP-SGD accuracy {results[1]['accuracy']:.3f}"
    print(line)
    return results


if __name__ == "__main__":
    main()

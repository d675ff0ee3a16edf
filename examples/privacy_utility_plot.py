#!/usr/bin/env python
"""Privacy-utility trade-off on the digits, and how three accountants count the same training.

Left panel: DP-SGD test accuracy against the epsilon spent, one point per noise multiplier
(each a full run of ``examples/digits.py``), with the non-private accuracy as a reference line.
Right panel: epsilon against epochs for one noise multiplier and sampling rate, as computed by
the RDP (Mironov 2017), PRV (Gopi et al. 2021) and GDP (Dong et al. 2019, a CLT approximation
that can under-report) accountants. Writes a PNG (matplotlib, ``pip install matplotlib``).
"""

import contextlib
import io
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402 (the examples' shared helpers)
import digits  # noqa: E402 (sibling example)


def accountant_curves(sigma, sample_rate, epochs, delta):
    """``{name: [eps after 1..epochs epochs]}`` for the RDP, PRV and GDP accountants."""
    from opacus.accountants import create_accountant

    steps_per_epoch = int(round(1 / sample_rate))
    curves = {}
    for name in ("rdp", "prv", "gdp"):
        accountant = create_accountant(name)
        curves[name] = []
        for epoch in range(1, epochs + 1):
            # the history is a list of (noise_multiplier, sample_rate, num_steps) events
            accountant.history = [(sigma, sample_rate, epoch * steps_per_epoch)]
            curves[name].append(accountant.get_epsilon(delta))
    return curves


def run_digits(extra):
    """Runs ``digits.main`` quietly; returns ``(test accuracy, eps)``."""
    with contextlib.redirect_stdout(io.StringIO()):
        return digits.main(["--no-progress", *extra])


def parse_args(argv=None):
    p = common.make_parser(__doc__)
    p.add_argument("--output", default="privacy_utility.png", help="PNG file to write")
    p.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        default=[0.5, 0.8, 1.2, 2.5],
        help="noise multipliers, one DP run each",
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs of each digits run")
    p.add_argument("--max-steps", type=int, default=None, help="cut each run short (testing)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--accountant-sigma", type=float, default=1.0)
    p.add_argument("--accountant-epochs", type=int, default=30)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(
            "this example draws with matplotlib: `pip install matplotlib` "
            "(or `pip install -e '.[examples]'`)"
        ) from exc

    start = time.time()
    shared = [
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--delta",
        str(args.delta),
    ]
    if args.max_steps is not None:
        shared += ["--max-steps", str(args.max_steps)]
    runs = [("non-private", ["--disable-dp"])] + [
        (f"sigma={s:g}", ["--sigma", str(s)]) for s in args.sigmas
    ]
    bar = common.tqdm(runs, desc="digits runs") if common.bars_enabled(args) else runs
    points = {}
    for label, extra in bar:
        points[label] = run_digits(shared + extra)
        if bar is not runs:
            acc, eps = points[label]
            bar.set_postfix(run=label, acc=f"{acc:.3f}", eps=f"{eps:.2f}")
    baseline_acc = points.pop("non-private")[0]
    for label, (acc, eps) in points.items():
        print(f"{label:>12s}: eps {eps:7.2f}  test accuracy {acc:.3f}")
    print(f"{'non-private':>12s}: eps     inf  test accuracy {baseline_acc:.3f}")

    n_train = len(digits.load_digits_tensors(0)[0])
    sample_rate = 1 / math.ceil(n_train / args.batch_size)  # as make_private: 1 / len(loader)
    curves = accountant_curves(
        args.accountant_sigma, sample_rate, args.accountant_epochs, args.delta
    )

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    eps_acc = sorted((eps, acc, label) for label, (acc, eps) in points.items())
    left.plot([e for e, _, _ in eps_acc], [a for _, a, _ in eps_acc], "o-", label="DP-SGD")
    for eps, acc, label in eps_acc:
        left.annotate(label, (eps, acc), textcoords="offset points", xytext=(4, -12), fontsize=8)
    left.axhline(baseline_acc, color="gray", linestyle="--", label="non-private")
    left.axhline(0.1, color="lightgray", linestyle=":", label="chance")
    left.set_xscale("log")
    left.set_xlabel(f"epsilon (delta={args.delta:g})")
    left.set_ylabel("test accuracy")
    left.set_title(f"digits CNN, {args.epochs} epochs, batch {args.batch_size}")
    left.legend(loc="lower right")
    epochs = range(1, args.accountant_epochs + 1)
    for name, eps in curves.items():
        right.plot(epochs, eps, label=name.upper())
    right.set_xlabel("epochs")
    right.set_ylabel(f"epsilon (delta={args.delta:g})")
    right.set_title(f"sigma={args.accountant_sigma:g}, sample rate {sample_rate:.3f}")
    right.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    last = {name: eps[-1] for name, eps in curves.items()}
    print(
        f"after {args.accountant_epochs} epochs: "
        + ", ".join(f"{k.upper()} eps {v:.2f}" for k, v in last.items())
    )
    best = max(points.items(), key=lambda kv: kv[1][0])
    all_eps = [eps for _, eps in points.values()]
    print(
        f"RESULT: wrote {args.output}: {len(points)} DP runs, eps {min(all_eps):.2f}"
        f"..{max(all_eps):.2f}, best DP accuracy {best[1][0]:.3f} "
        f"({best[0]}) vs {baseline_acc:.3f} non-private, in {time.time() - start:.0f}s"
    )


if __name__ == "__main__":
    main()

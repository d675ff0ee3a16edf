#!/usr/bin/env python
"""Test accuracy of DP-SGD vs banded matrix-factorization noise at equal (eps, delta).

Two models from the examples: the digits CNN (examples/digits.py, scikit-learn's 8x8 digits)
and the tiny transformer of examples/text_classification.py (examples/data/sentences.tsv). For
each target eps, each method (DP-SGD = ``bands`` 1; banded MF with the banded square-root
coefficients for each ``b`` in ``--bands``) and each seed, the noise multiplier is calibrated by
``make_private_with_epsilon`` (for banded MF through the reduction: ``ceil(T / b)`` DP-SGD steps
at the per-group rate) and the model is trained for the same number of steps with the same
expected batch size and optimizer. Prints a Markdown table (mean +- standard deviation over the
seeds), optionally writes it (``--out-md``), a JSON file of every run (``--out-json``) and a PNG
plot (``--out-png``).

    python benchmarks/banded_mf_accuracy.py --out-md bench.md --out-png bench.png
    python benchmarks/banded_mf_accuracy.py --quick        # seconds, for smoke tests
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _example(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    spec = importlib.util.spec_from_file_location(f"_bench_example_{name}", f"{EXAMPLES}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_task(seed):
    """``(train_set, test_set, model_fn, optimizer_fn)`` of examples/digits.py."""
    digits = _example("digits")
    train, test = digits.load_digits_tensors(0)  # one fixed split; seeds vary the training
    return (
        train,
        test,
        lambda: digits.make_model("digits"),
        lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.0),
    )


def text_task(seed):
    """``(train_set, test_set, model_fn, optimizer_fn)`` of examples/text_classification.py."""
    text = _example("text_classification")
    rows = text.common.read_tsv(text.DEFAULT_DATA)
    n_test = len(rows) // 5
    train_ids, train_y, vocab, labels, max_len = text.encode(rows[n_test:])
    test_ids, test_y, *_ = text.encode(rows[:n_test], vocab, labels, max_len)
    return (
        TensorDataset(train_ids, train_y),
        TensorDataset(test_ids, test_y),
        lambda: text.TinyTransformer(len(vocab) + 2, len(labels), max_len, 32, 4),
        lambda params: torch.optim.Adam(params, lr=0.02),
    )


def text_sgd_task(seed, lr=None):
    """The text model trained with SGD + momentum (parameters linear in the noisy prefix sums,
    the setting banded MF is designed for) instead of the example's Adam."""
    train, test, model_fn, _ = text_task(seed)
    lr = TEXT_SGD_LR if lr is None else lr
    return train, test, model_fn, lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


TEXT_SGD_LR = 0.1
TASKS = {"digits": digits_task, "text": text_task, "text-sgd": text_sgd_task}


def accuracy(model, data):
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        correct = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return correct


def train_once(task, bands, eps, seed, *, epochs, batch_size, delta, max_grad_norm, lr_scale=1.0):
    """Test accuracy of one private run; ``bands=1`` is DP-SGD. Returns a dict."""
    from opacus import PrivacyEngine

    train, test, model_fn, optimizer_fn = TASKS[task](seed)
    if lr_scale != 1.0:
        base_fn = optimizer_fn

        def optimizer_fn(params):
            optimizer = base_fn(params)
            for group in optimizer.param_groups:
                group["lr"] *= lr_scale
            return optimizer

    torch.manual_seed(seed)
    model = model_fn()
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(
        train, batch_size=batch_size, generator=torch.Generator().manual_seed(1000 + seed)
    )
    kwargs = {} if bands == 1 else dict(noise_mechanism="banded_mf", bands=bands)
    module, optimizer, dp_loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer_fn(model.parameters()),
        data_loader=loader,
        target_epsilon=eps,
        target_delta=delta,
        epochs=epochs,
        max_grad_norm=max_grad_norm,
        noise_generator=torch.Generator().manual_seed(2000 + seed),
        **kwargs,
    )
    criterion = nn.CrossEntropyLoss()
    steps = 0
    for _ in range(epochs):
        for x, y in dp_loader:
            optimizer.zero_grad()
            out = module(x)
            loss = criterion(out, y) if len(y) else out.sum() * 0.0
            loss.backward()
            optimizer.step()
            steps += 1
    return dict(
        task=task,
        bands=bands,
        eps_target=eps,
        seed=seed,
        accuracy=accuracy(module, test),
        eps_spent=engine.get_epsilon(delta),
        sigma=optimizer.noise_multiplier,
        steps=steps,
    )


def method_name(bands):
    return "DP-SGD" if bands == 1 else f"banded MF b={bands}"


def table(runs, tasks, epsilons, bands_list):
    """Markdown: one row per (task, method), one column per eps, mean +- sd (sigma)."""
    header = "| model | method | " + " | ".join(f"ε = {e:g}" for e in epsilons) + " |"
    lines = [header, "| --- | --- | " + " | ".join("---:" for _ in epsilons) + " |"]
    for task in tasks:
        for b in bands_list:
            cells = []
            for e in epsilons:
                sel = [r for r in runs if (r["task"], r["bands"], r["eps_target"]) == (task, b, e)]
                accs = [r["accuracy"] for r in sel]
                if not accs:
                    cells.append("")
                    continue
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                cells.append(
                    f"{100 * statistics.mean(accs):.1f} ± {100 * sd:.1f} (σ {sel[0]['sigma']:.2f})"
                )
            lines.append(f"| {task} | {method_name(b)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise_table(runs, tasks, epsilons, bands_list):
    """Markdown: the noise std in the prefix sums of the updates (what SGD's parameters carry),
    banded MF relative to DP-SGD at the same eps: ``(sigma_b / sigma_1) * sqrt(err_b / err_1)``
    with ``err`` = ``prefix_sum_error`` over the run's steps (below 1: less noise than DP-SGD)."""
    from opacus.optimizers.correlated_noise import banded_sqrt_coefficients, prefix_sum_error

    others = [b for b in bands_list if b != 1]
    header = "| model | ε | " + " | ".join(f"b={b}" for b in others) + " |"
    lines = [header, "| --- | ---: | " + " | ".join("---:" for _ in others) + " |"]
    for task in tasks:
        for e in epsilons:
            base = [r for r in runs if (r["task"], r["bands"], r["eps_target"]) == (task, 1, e)]
            if not base:
                continue
            steps = base[0]["steps"]
            err1 = prefix_sum_error([1.0], steps)
            cells = []
            for b in others:
                sel = [r for r in runs if (r["task"], r["bands"], r["eps_target"]) == (task, b, e)]
                if not sel:
                    cells.append("")
                    continue
                errb = prefix_sum_error(banded_sqrt_coefficients(b), steps)
                ratio = sel[0]["sigma"] / base[0]["sigma"] * (errb / err1) ** 0.5
                cells.append(f"{ratio:.2f}")
            lines.append(f"| {task} | {e:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs, tasks, epsilons, bands_list, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker.NullFormatter below)

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for k, b in enumerate(bands_list):
            means, sds = [], []
            for e in epsilons:
                accs = [
                    r["accuracy"]
                    for r in runs
                    if (r["task"], r["bands"], r["eps_target"]) == (task, b, e)
                ]
                means.append(100 * statistics.mean(accs))
                sds.append(100 * (statistics.stdev(accs) if len(accs) > 1 else 0.0))
            shift = [e * (1 + 0.04 * (k - (len(bands_list) - 1) / 2)) for e in epsilons]
            ax.errorbar(shift, means, yerr=sds, marker="o", capsize=3, label=method_name(b))
        ax.set_xscale("log")
        ax.set_xticks(epsilons)
        ax.set_xticklabels([f"{e:g}" for e in epsilons])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["digits", "text"], choices=sorted(TASKS))
    p.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    p.add_argument("--bands", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[64],
        help="expected batch size: one for all tasks, or one per task (in --tasks order)",
    )
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every task's lr")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, eps 3, b in {1, 2}")
    p.add_argument("--out-md", default=None)
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-png", default=None)
    args = p.parse_args(argv)
    if len(args.batch_size) not in (1, len(args.tasks)):
        p.error("--batch-size takes one value, or one per task")
    if len(args.batch_size) == 1:
        args.batch_size = args.batch_size * len(args.tasks)
    if args.quick:
        args.epochs, args.seeds, args.epsilons, args.bands = 1, 1, [3.0], [1, 2]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runs, start = [], time.time()
    for task, batch_size in zip(args.tasks, args.batch_size):
        for eps in args.epsilons:
            for b in args.bands:
                for seed in range(args.seeds):
                    run = train_once(
                        task,
                        b,
                        eps,
                        seed,
                        epochs=args.epochs,
                        batch_size=batch_size,
                        delta=args.delta,
                        max_grad_norm=args.max_grad_norm,
                        lr_scale=args.lr_scale,
                    )
                    runs.append(run)
                    print(
                        f"{task} {method_name(b)} eps {eps:g} seed {seed}: acc "
                        f"{run['accuracy']:.3f} (sigma {run['sigma']:.3f}, eps spent "
                        f"{run['eps_spent']:.3f}, {run['steps']} steps)",
                        flush=True,
                    )
    md = table(runs, args.tasks, args.epsilons, args.bands)
    if 1 in args.bands and len(args.bands) > 1:
        md += (
            "\n\nPrefix-sum noise std, banded MF / DP-SGD at equal ε (below 1: less noise):\n\n"
            + noise_table(runs, args.tasks, args.epsilons, args.bands)
        )
    elapsed = time.time() - start
    summary = (
        f"{args.epochs} epochs, expected batch {dict(zip(args.tasks, args.batch_size))}, "
        f"lr x {args.lr_scale:g}, max_grad_norm "
        f"{args.max_grad_norm}, delta {args.delta:g}, {args.seeds} seeds, RDP accountant; "
        f"{elapsed:.0f} s"
    )
    print()
    print(md)
    print(summary)
    if args.out_md:
        with open(args.out_md, "w", encoding="utf8") as f:
            f.write(md + "\n\n" + summary + "\n")
    if args.out_json:
        with open(args.out_json, "w", encoding="utf8") as f:
            json.dump(runs, f, indent=1)
    if args.out_png:
        plot(runs, args.tasks, args.epsilons, args.bands, args.out_png)
    return runs


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Ghost clipping vs per-sample gradients: same DP-SGD, a fraction of the memory.

``grad_sample_mode="hooks"`` materialises every sample's gradient, ``batch x #params`` numbers;
``grad_sample_mode="ghost"`` (Li et al. 2022) only computes every sample's gradient *norm* from
the layer's activations and backprops, then a second backward of the clipping-weighted loss
yields the clipped sum directly. The model here is built for the difference to show: a large
hashed n-gram ``nn.Embedding`` and wide per-token ``nn.Linear`` layers, classifying the shipped
sentences of ``examples/data/sentences.tsv``. Each mode runs in its own process so that its peak
resident memory (``resource.getrusage``) is its own; the summary compares them.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import zlib

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as common  # noqa: E402 (the examples' shared helpers, next to this script)

DEFAULT_DATA = os.path.join(HERE, "data", "sentences.tsv")


def hashed_ngrams(text, buckets, max_len):
    """Ids of the words and word bigrams of ``text`` hashed into ``1..buckets-1`` (0 pads)."""
    words = text.lower().split()
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    ids = [1 + zlib.crc32(g.encode("utf8")) % (buckets - 1) for g in grams][:max_len]
    return ids + [0] * (max_len - len(ids))


def load(path, buckets, max_len):
    rows = common.read_tsv(path)
    labels = {name: i for i, name in enumerate(sorted({label for label, _ in rows}))}
    x = torch.tensor([hashed_ngrams(text, buckets, max_len) for _, text in rows])
    y = torch.tensor([labels[label] for label, _ in rows])
    n_test = len(rows) // 5
    return (
        TensorDataset(x[n_test:], y[n_test:]),
        TensorDataset(x[:n_test], y[:n_test]),
        len(labels),
    )


class NGramModel(nn.Module):
    """Embedding -> per-token MLP (``nn.Linear`` on ``(N, T, d)``) -> mean over tokens -> head."""

    def __init__(self, buckets, num_classes, dim, hidden):
        super().__init__()
        self.embed = nn.Embedding(buckets, dim, padding_idx=0)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        keep = (ids != 0).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.head(pooled)


def peak_rss_mib():
    """This process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def train_one_mode(args):
    """Trains with ``args.mode`` in this process; returns a dict of measurements."""
    torch.manual_seed(args.seed)
    train_set, test_set, num_classes = load(args.data, args.buckets, args.max_len)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=256)
    model = NGramModel(args.buckets, num_classes, args.dim, args.hidden)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    from opacus import PrivacyEngine

    privacy_engine = PrivacyEngine(accountant="prv")
    private = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        criterion=nn.CrossEntropyLoss(),
        noise_multiplier=args.sigma,
        max_grad_norm=args.max_grad_norm,
        grad_sample_mode=args.mode,
    )
    if args.mode == "ghost":
        # ghost mode also returns a criterion whose backward() does the double backward
        model, optimizer, criterion, train_loader = private
    else:
        model, optimizer, train_loader = private
        criterion = nn.CrossEntropyLoss()

    peak_before = peak_rss_mib()
    start, steps, eps = time.time(), 0, float("nan")
    show_bar = common.bars_enabled(args)
    for epoch in range(1, args.epochs + 1):
        bar = common.progress(train_loader, f"{args.mode} epoch {epoch}/{args.epochs}", show_bar)
        for x, y in bar:
            optimizer.zero_grad()
            out = model(x)
            # with ghost clipping, this backward() is the double backward of the DP criterion
            loss = criterion(out, y)
            loss.backward()
            optimizer.step()
            steps += 1
            if show_bar:
                common.show_batch(bar, loss, out, y, lambda: privacy_engine.get_epsilon(args.delta))
            if common.out_of_steps(steps, args.max_steps):
                break
        eps = privacy_engine.get_epsilon(args.delta)
        if common.out_of_steps(steps, args.max_steps):
            break
    elapsed = time.time() - start
    return {
        "mode": args.mode,
        "params": n_params,
        "steps": steps,
        "seconds_per_step": elapsed / max(steps, 1),
        "peak_rss_mib": peak_rss_mib(),
        "training_peak_mib": peak_rss_mib() - peak_before,
        "test_acc": common.evaluate(model, test_loader),
        "eps": eps,
    }


def parse_args(argv=None):
    p = common.make_parser(__doc__)
    p.add_argument(
        "--mode",
        default="both",
        choices=["both", "hooks", "ghost"],
        help="both: run hooks and ghost, each in a fresh process, and compare",
    )
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--buckets", type=int, default=32768, help="hashed n-gram vocabulary size")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=24)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64, help="expected batch size")
    p.add_argument("--lr", type=float, default=0.03, help="Adam learning rate")
    common.add_privacy_args(p, sigma=1.0)
    common.add_run_args(p)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child -> parent
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    common.set_threads(args)
    if args.mode != "both":
        result = train_one_mode(args)
        if args.json:
            print("MEASURED " + json.dumps(result))
        else:
            print(
                f"RESULT: {args.mode}: peak RSS {result['peak_rss_mib']:.0f} MiB "
                f"(+{result['training_peak_mib']:.0f} MiB while training), "
                f"{1000 * result['seconds_per_step']:.0f} ms/step, test accuracy "
                f"{result['test_acc']:.3f} at eps {result['eps']:.2f}"
            )
        return result

    results = {}
    for mode in ("hooks", "ghost"):
        # a fresh interpreter per mode: ru_maxrss is a high-water mark that never goes down
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--mode", mode, "--json"],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        line = [ln for ln in child.stdout.splitlines() if ln.startswith("MEASURED ")][-1]
        results[mode] = json.loads(line[len("MEASURED ") :])
    print(f"model: {results['hooks']['params']:,} parameters, batch size {args.batch_size}")
    print(f"{'mode':6s} {'peak RSS':>10s} {'+training':>10s} {'ms/step':>8s} {'test acc':>9s}")
    for mode, r in results.items():
        print(
            f"{mode:6s} {r['peak_rss_mib']:8.0f}MB {r['training_peak_mib']:8.0f}MB "
            f"{1000 * r['seconds_per_step']:8.0f} {r['test_acc']:9.3f}"
        )
    hooks, ghost = results["hooks"], results["ghost"]
    ratio = hooks["training_peak_mib"] / max(ghost["training_peak_mib"], 1.0)
    print(
        f"RESULT: training memory hooks {hooks['training_peak_mib']:.0f} MiB vs ghost "
        f"{ghost['training_peak_mib']:.0f} MiB ({ratio:.1f}x less); test accuracy hooks "
        f"{hooks['test_acc']:.3f}, ghost {ghost['test_acc']:.3f} at eps {ghost['eps']:.2f}"
    )
    return results


if __name__ == "__main__":
    main()

"""Plumbing shared by the example scripts: command-line flags, progress bars, accuracy, TSV data.

Not an example itself. Each script stays runnable on its own (``python examples/<name>.py``): it
puts its own folder on ``sys.path`` and imports this module from there. The DP-specific parts
(``make_private``, ``BatchMemoryManager``, the ghost-clipping criterion) stay in the scripts.
"""

import argparse
import time

import numpy as np
import torch

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


# ------------------------------------------------------------------ command line
def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's docstring, showing the defaults."""
    return argparse.ArgumentParser(
        description=doc.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def add_privacy_args(p: argparse.ArgumentParser, *, sigma: float) -> None:
    """``--sigma``, ``--max-grad-norm`` and ``--delta``."""
    p.add_argument("--sigma", type=float, default=sigma, help="noise multiplier")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)


def add_run_args(
    p: argparse.ArgumentParser, *, threads_help: str = "torch threads (0: torch's default)"
) -> None:
    """``--max-steps``, ``--threads``, ``--seed`` and ``--no-progress``."""
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--threads", type=int, default=1, help=threads_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def set_threads(args) -> None:
    """Apply ``--threads`` (0 keeps torch's default)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)


def out_of_steps(steps: int, max_steps) -> bool:
    """True once ``--max-steps`` (None: no limit) steps have been taken."""
    return max_steps is not None and steps >= max_steps


# ------------------------------------------------------------------ progress
def bars_enabled(args) -> bool:
    """Progress bars are shown when tqdm is installed and ``--no-progress`` is not given."""
    return tqdm is not None and not args.no_progress


def progress(iterable, desc: str, enabled: bool):
    """``iterable`` behind a transient tqdm bar when ``enabled``, else unchanged."""
    return tqdm(iterable, desc=desc, leave=False) if enabled else iterable


def show_batch(bar, loss, out, y, eps) -> None:
    """Put one batch's loss and accuracy (nan for an empty batch) and the eps on ``bar``.

    ``eps`` is a number or a function returning the ε spent so far; a function is asked at
    most twice a second (and on the bar's last batch), so the bar shows the current ε.
    """
    acc = (out.argmax(-1) == y).float().mean().item() if len(y) else float("nan")
    if callable(eps):
        now, (value, asked) = time.monotonic(), getattr(bar, "_live_eps", (None, 0.0))
        last = bar.total is not None and bar.n + 1 >= bar.total
        if value is None or last or now - asked > 0.5:
            value, asked = eps(), now
        bar._live_eps = (value, asked)
        eps = value
    bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}", eps=f"{eps:.2f}")


# ------------------------------------------------------------------ training and evaluation
def sgd_step(model, optimizer, criterion, x, y):
    """One optimizer step on ``(x, y)``; returns ``(output, loss)``.

    An empty Poisson batch still takes a (noise-only) step, through a zero loss.
    """
    optimizer.zero_grad()
    out = model(x)
    loss = criterion(out, y) if len(y) else out.sum() * 0.0
    loss.backward()
    optimizer.step()
    return out, loss


class EpochStats:
    """Running loss and accuracy of the training batches of one epoch."""

    def __init__(self):
        self.loss_sum, self.batch_losses, self.correct, self.seen = 0.0, [], 0, 0

    def add(self, loss, out, y) -> None:
        self.loss_sum += loss.item() * len(y)
        self.batch_losses.append(loss.item())
        self.correct += (out.argmax(-1) == y).sum().item()
        self.seen += len(y)

    def loss(self, per_batch: bool = False) -> float:
        """Mean loss per sample, or (``per_batch``) the mean of the batch losses."""
        if per_batch:
            return np.mean(self.batch_losses)
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)


def train_epoch(
    model,
    optimizer,
    criterion,
    loader,
    *,
    desc,
    show_bar,
    eps,
    steps,
    max_steps,
    prepare=None,
    per_batch_loss=False,
):
    """One pass over ``loader`` with :func:`sgd_step`, stopping at ``max_steps`` in total.

    ``prepare`` maps each input batch before the model (e.g. a layout change). ``eps`` is the ε
    to show on the bar: a number, or a function returning the ε spent so far, which is then
    asked at most twice a second and after the last batch, so that the bar never shows the
    previous epoch's ε. Returns ``(EpochStats, steps)`` with ``steps`` the running total.
    """
    stats = EpochStats()
    bar = progress(loader, desc, show_bar)
    current = eps() if callable(eps) else eps
    asked = time.monotonic()
    total = len(loader) if hasattr(loader, "__len__") else None
    for i, (x, y) in enumerate(bar):
        out, loss = sgd_step(model, optimizer, criterion, x if prepare is None else prepare(x), y)
        stats.add(loss, out, y)
        steps += 1
        last = out_of_steps(steps, max_steps) or (total is not None and i + 1 >= total)
        if show_bar:
            if callable(eps) and (last or time.monotonic() - asked > 0.5):
                current, asked = eps(), time.monotonic()
            bar.set_postfix(
                loss=f"{stats.loss(per_batch_loss):.3f}",
                acc=f"{stats.accuracy:.3f}",
                eps=f"{current:.2f}",
            )
        if out_of_steps(steps, max_steps):
            break
    return stats, steps


def evaluate(model, loader, prepare=None) -> float:
    """Accuracy of ``model`` (in eval mode, no gradients) on ``loader``."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            x = x if prepare is None else prepare(x)
            correct += (model(x).argmax(-1) == y).sum().item()
            total += len(y)
    model.train()
    return correct / max(total, 1)


# ------------------------------------------------------------------ data
def read_tsv(path):
    """``[(label, text), ...]`` from a two-column TSV file with a header line."""
    with open(path, encoding="utf8") as f:
        next(f)
        return [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]

#!/usr/bin/env python
"""DP-SGD image classification on scikit-learn's bundled 8x8 digits (no download).

Trains a small CNN with ``PrivacyEngine.make_private`` (or ``make_private_with_epsilon`` when
``--target-epsilon`` is given), shows loss, accuracy and the epsilon spent as it goes, and ends
with a one-line ``RESULT:`` summary. ``--disable-dp`` trains the same model without privacy for
comparison. ``--dataset mnist`` or ``--dataset cifar10`` trains on torchvision's copy of those data
sets instead, read from ``--data-root`` (never downloaded unless ``--download`` is given).
"""

import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402 (the examples' shared helpers, next to this script)


def load_digits_tensors(seed: int):
    """scikit-learn's 1797 8x8 digits, scaled to [-1, 1], split 80/20 (deterministic)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    return TensorDataset(x[n_test:], y[n_test:]), TensorDataset(x[:n_test], y[:n_test])


# Per-channel means/stds of the training sets, the usual published values.
_TORCHVISION_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def load_torchvision(name: str, root: str, download: bool):
    """MNIST or CIFAR-10 from ``root`` via torchvision (an optional dependency)."""
    try:
        import torchvision
        import torchvision.transforms as T
    except ImportError as exc:
        raise SystemExit(
            f"--dataset {name} needs torchvision, which is not installed: "
            "`pip install torchvision` (matching your torch), or use the default --dataset digits"
        ) from exc
    mean, std = _TORCHVISION_STATS[name]
    transform = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.CIFAR10
    try:
        train = cls(root, train=True, download=download, transform=transform)
        test = cls(root, train=False, download=download, transform=transform)
    except RuntimeError as exc:
        raise SystemExit(
            f"{name} was not found under --data-root {root!r} ({exc}). Point --data-root at a "
            "folder that holds it, or pass --download to let torchvision fetch it."
        ) from exc
    return train, test


def make_model(dataset: str = "digits") -> nn.Module:
    """A small CNN; GroupNorm, not BatchNorm (batch statistics would mix samples)."""
    channels, side = {"digits": (1, 8), "mnist": (1, 28), "cifar10": (3, 32)}[dataset]
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (side // 4) ** 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def parse_args(argv=None):
    p = common.make_parser(__doc__)
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist", "cifar10"])
    p.add_argument("--data-root", default="./data", help="where torchvision data sets live")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="expected logical batch size")
    p.add_argument("--max-physical-batch-size", type=int, default=32)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="SGD learning rate (default 0.5 with DP, whose clipping shrinks the gradients; 0.2 "
        "without)",
    )
    common.add_privacy_args(p, sigma=1.0)
    p.add_argument("--target-epsilon", type=float, default=None)
    p.add_argument("--accountant", default="prv", choices=["prv", "rdp", "gdp"])
    p.add_argument("--grad-sample-mode", default="hooks", choices=["hooks", "functorch", "ew"])
    p.add_argument("--disable-dp", action="store_true")
    common.add_run_args(
        p, threads_help="torch threads; tiny models run fastest on one (0 keeps torch's default)"
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.dataset == "digits":
        train_set, test_set = load_digits_tensors(args.seed)
    else:
        train_set, test_set = load_torchvision(args.dataset, args.data_root, args.download)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=256)

    model = make_model(args.dataset)
    lr = args.lr if args.lr is not None else (0.2 if args.disable_dp else 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    criterion = nn.CrossEntropyLoss()
    privacy_engine = None
    if not args.disable_dp:
        from opacus import PrivacyEngine

        privacy_engine = PrivacyEngine(accountant=args.accountant)
        engine_args = dict(
            module=model,
            optimizer=optimizer,
            data_loader=train_loader,
            max_grad_norm=args.max_grad_norm,
            grad_sample_mode=args.grad_sample_mode,
        )
        if args.target_epsilon is not None:
            model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
                **engine_args,
                target_epsilon=args.target_epsilon,
                target_delta=args.delta,
                epochs=args.epochs,
            )
        else:
            model, optimizer, train_loader = privacy_engine.make_private(
                **engine_args, noise_multiplier=args.sigma
            )
        print(
            f"DP-SGD: noise multiplier {optimizer.noise_multiplier:.3f}, "
            f"max grad norm {args.max_grad_norm}, sample rate {1 / len(train_loader):.4f}"
        )

    start = time.time()
    eps = float("nan")
    steps = 0
    show_bar = common.bars_enabled(args)
    # the bar shows the ε spent so far (not the previous epoch's)
    live_eps = (
        (lambda: privacy_engine.get_epsilon(args.delta))
        if privacy_engine is not None
        else float("nan")
    )
    for epoch in range(1, args.epochs + 1):
        if privacy_engine is not None:
            from opacus.utils.batch_memory_manager import BatchMemoryManager

            ctx = BatchMemoryManager(
                data_loader=train_loader,
                max_physical_batch_size=args.max_physical_batch_size,
                optimizer=optimizer,
            )
        else:
            ctx = _NullContext(train_loader)
        with ctx as loader:
            stats, steps = common.train_epoch(
                model,
                optimizer,
                criterion,
                loader,
                desc=f"epoch {epoch}/{args.epochs}",
                show_bar=show_bar,
                eps=live_eps,
                steps=steps,
                max_steps=args.max_steps,
                per_batch_loss=True,
            )
        if privacy_engine is not None:
            eps = privacy_engine.get_epsilon(args.delta)
        test_acc = common.evaluate(model, test_loader)
        eps_text = f" | eps {eps:.2f} (delta={args.delta})" if privacy_engine is not None else ""
        print(
            f"epoch {epoch:3d} | loss {stats.loss(per_batch=True):.4f}"
            f" | train acc {stats.accuracy:.3f}"
            f" | test acc {test_acc:.3f}{eps_text}"
        )
        if common.out_of_steps(steps, args.max_steps):
            break
    elapsed = time.time() - start
    test_acc = common.evaluate(model, test_loader)
    if privacy_engine is not None:
        print(
            f"RESULT: test accuracy {test_acc:.3f} at eps {eps:.2f}, delta {args.delta} "
            f"({args.accountant} accountant), {epoch} epochs in {elapsed:.1f}s"
        )
    else:
        print(
            f"RESULT: test accuracy {test_acc:.3f} without privacy, {epoch} epochs "
            f"in {elapsed:.1f}s"
        )
    return test_acc, eps


class _NullContext:
    def __init__(self, loader):
        self.loader = loader

    def __enter__(self):
        return self.loader

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()

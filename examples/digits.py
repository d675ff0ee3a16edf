#!/usr/bin/env python
"""DP-SGD image classification on scikit-learn's bundled 8x8 digits (no download).

Trains a small CNN with ``PrivacyEngine.make_private`` (or ``make_private_with_epsilon`` when
``--target-epsilon`` is given), shows loss, accuracy and the epsilon spent as it goes, and ends with a
one-line summary. ``--disable-dp`` trains the same model without privacy for comparison.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


def load_digits_tensors(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    return TensorDataset(x[n_test:], y[n_test:]), TensorDataset(x[:n_test], y[:n_test])


def make_model() -> nn.Module:
    # GroupNorm, not BatchNorm: batch statistics would mix samples (ModuleValidator rejects BatchNorm).
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def evaluate(model, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(dim=1) == y).sum().item()
            total += len(y)
    model.train()
    return correct / max(total, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="expected logical batch size")
    p.add_argument("--max-physical-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--sigma", type=float, default=1.0, help="noise multiplier")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--target-epsilon", type=float, default=None)
    p.add_argument("--accountant", default="prv", choices=["prv", "rdp", "gdp"])
    p.add_argument("--grad-sample-mode", default="hooks", choices=["hooks", "functorch", "ew"])
    p.add_argument("--disable-dp", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    train_set, test_set = load_digits_tensors(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=256)

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0)
    criterion = nn.CrossEntropyLoss()
    privacy_engine = None
    if not args.disable_dp:
        from opacus import PrivacyEngine

        privacy_engine = PrivacyEngine(accountant=args.accountant)
        common = dict(
            module=model,
            optimizer=optimizer,
            data_loader=train_loader,
            max_grad_norm=args.max_grad_norm,
            grad_sample_mode=args.grad_sample_mode,
        )
        if args.target_epsilon is not None:
            model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
                **common, target_epsilon=args.target_epsilon, target_delta=args.delta,
                epochs=args.epochs,
            )
        else:
            model, optimizer, train_loader = privacy_engine.make_private(
                **common, noise_multiplier=args.sigma
            )
        print(f"DP-SGD: noise multiplier {optimizer.noise_multiplier:.3f}, "
              f"max grad norm {args.max_grad_norm}, sample rate {1 / len(train_loader):.4f}")

    start = time.time()
    eps = float("nan")
    for epoch in range(1, args.epochs + 1):
        losses, correct, seen = [], 0, 0
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
            bar = loader
            if tqdm is not None and not args.no_progress:
                bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False)
            for x, y in bar:
                optimizer.zero_grad()
                if len(y) == 0:
                    # an empty Poisson batch still takes a (noise-only) step
                    out = model(x)
                    loss = out.sum() * 0.0
                else:
                    out = model(x)
                    loss = criterion(out, y)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                correct += (out.argmax(dim=1) == y).sum().item()
                seen += len(y)
                if tqdm is not None and not args.no_progress and privacy_engine is not None:
                    bar.set_postfix(loss=f"{np.mean(losses):.3f}", acc=f"{correct / max(seen, 1):.3f}")
        if privacy_engine is not None:
            eps = privacy_engine.get_epsilon(args.delta)
        test_acc = evaluate(model, test_loader)
        eps_text = f" | eps {eps:.2f} (delta={args.delta})" if privacy_engine is not None else ""
        print(f"epoch {epoch:3d} | loss {np.mean(losses):.4f} | train acc {correct / max(seen, 1):.3f}"
              f" | test acc {test_acc:.3f}{eps_text}")
    elapsed = time.time() - start
    test_acc = evaluate(model, test_loader)
    if privacy_engine is not None:
        print(f"RESULT: test accuracy {test_acc:.3f} at eps {eps:.2f}, delta {args.delta} "
              f"({args.accountant} accountant), {args.epochs} epochs in {elapsed:.1f}s")
    else:
        print(f"RESULT: test accuracy {test_acc:.3f} without privacy, {args.epochs} epochs "
              f"in {elapsed:.1f}s")
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

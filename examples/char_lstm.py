#!/usr/bin/env python
"""DP-SGD character-level LSTM: which invented language does a name come from?

A ``opacus.layers.DPLSTM`` (a drop-in for ``nn.LSTM`` whose gates are ``RNNLinear`` layers, so
per-sample gradients are summed over time steps) reads a name letter by letter; a linear head on
its last hidden state predicts one of the three made-up languages of
``examples/data/names.tsv`` (regenerate it with ``examples/data/make_names.py``).
"""

import argparse
import os
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "names.tsv")
PAD = 0


def read_tsv(path):
    """``[(label, name), ...]`` from a two-column TSV file with a header line."""
    with open(path, encoding="utf8") as f:
        next(f)
        return [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]


def encode(rows, chars, labels, max_len):
    """Character ids ``(N, max_len)``, LEFT-padded so the last step is every name's last letter."""
    ids = torch.full((len(rows), max_len), PAD, dtype=torch.long)
    for i, (_, name) in enumerate(rows):
        codes = [chars.get(c, len(chars) + 1) for c in name.lower()][-max_len:]
        ids[i, max_len - len(codes):] = torch.tensor(codes, dtype=torch.long)
    y = torch.tensor([labels[label] for label, _ in rows], dtype=torch.long)
    return ids, y


class CharLSTM(nn.Module):
    def __init__(self, num_chars, num_classes, embed_dim=16, hidden=32):
        super().__init__()
        from opacus.layers import DPLSTM

        self.embed = nn.Embedding(num_chars, embed_dim, padding_idx=PAD)
        self.lstm = DPLSTM(embed_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, ids):  # ids: (N, T)
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


def evaluate(model, loader):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(-1) == y).sum().item()
            total += len(y)
    model.train()
    return correct / max(total, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=DEFAULT_DATA, help="TSV file: label<TAB>name")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="expected batch size")
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    p.add_argument("--sigma", type=float, default=1.5, help="noise multiplier")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", default="prv", choices=["prv", "rdp", "gdp"])
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--max-len", type=int, default=12, help="names are cut to their last letters")
    p.add_argument("--disable-dp", action="store_true")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    rows = read_tsv(args.data)
    n_test = len(rows) // 5
    # Ids 1.. for letters seen in training, len+1 for unseen ones, 0 for padding.
    letters = sorted({c for _, name in rows[n_test:] for c in name.lower()})
    chars = {c: i + 1 for i, c in enumerate(letters)}
    labels = {name: i for i, name in enumerate(sorted({label for label, _ in rows}))}
    train_x, train_y = encode(rows[n_test:], chars, labels, args.max_len)
    test_x, test_y = encode(rows[:n_test], chars, labels, args.max_len)
    print(f"{len(train_y)} training / {len(test_y)} test names, {len(chars)} letters, "
          f"labels {sorted(labels, key=labels.get)}")
    train_loader = DataLoader(TensorDataset(train_x, train_y), batch_size=args.batch_size,
                              shuffle=True)
    test_loader = DataLoader(TensorDataset(test_x, test_y), batch_size=256)

    model = CharLSTM(len(chars) + 2, len(labels), hidden=args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    criterion = nn.CrossEntropyLoss()
    privacy_engine = None
    if not args.disable_dp:
        from opacus import PrivacyEngine

        privacy_engine = PrivacyEngine(accountant=args.accountant)
        model, optimizer, train_loader = privacy_engine.make_private(
            module=model, optimizer=optimizer, data_loader=train_loader,
            noise_multiplier=args.sigma, max_grad_norm=args.max_grad_norm,
        )

    start, steps, eps = time.time(), 0, float("nan")
    show_bar = tqdm is not None and not args.no_progress
    for epoch in range(1, args.epochs + 1):
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", leave=False) if show_bar \
            else train_loader
        for x, y in bar:
            optimizer.zero_grad()
            out = model(x)
            # an empty Poisson batch still takes a (noise-only) step
            loss = criterion(out, y) if len(y) else out.sum() * 0.0
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            correct += (out.argmax(-1) == y).sum().item()
            seen += len(y)
            steps += 1
            if show_bar:
                bar.set_postfix(loss=f"{total_loss / max(seen, 1):.3f}",
                                acc=f"{correct / max(seen, 1):.3f}", eps=f"{eps:.2f}")
            if args.max_steps is not None and steps >= args.max_steps:
                break
        if privacy_engine is not None:
            eps = privacy_engine.get_epsilon(args.delta)
        if epoch % 5 == 0 or epoch == args.epochs or args.max_steps is not None:
            print(f"epoch {epoch:3d} | loss {total_loss / max(seen, 1):.4f} | train acc "
                  f"{correct / max(seen, 1):.3f} | test acc {evaluate(model, test_loader):.3f}"
                  f" | eps {eps:.2f}")
        if args.max_steps is not None and steps >= args.max_steps:
            break
    test_acc = evaluate(model, test_loader)
    privacy = (f"eps {eps:.2f}, delta {args.delta}" if privacy_engine is not None
               else "without privacy")
    print(f"RESULT: test accuracy {test_acc:.3f} ({len(labels)} classes) {privacy}, "
          f"{steps} steps in {time.time() - start:.1f}s")
    return test_acc, eps


if __name__ == "__main__":
    main()

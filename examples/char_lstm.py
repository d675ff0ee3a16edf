#!/usr/bin/env python
"""DP-SGD character-level LSTM: which invented language does a name come from?

A ``opacus.layers.DPLSTM`` (a drop-in for ``nn.LSTM`` whose gates are ``RNNLinear`` layers, so
per-sample gradients are summed over time steps) reads a name letter by letter; a linear head on
its last hidden state predicts one of the three made-up languages of
``examples/data/names.tsv`` (regenerate it with ``examples/data/make_names.py``).
"""

import os
import sys
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as common  # noqa: E402 (the examples' shared helpers, next to this script)

DEFAULT_DATA = os.path.join(HERE, "data", "names.tsv")
PAD = 0


def encode(rows, chars, labels, max_len):
    """Character ids ``(N, max_len)``, LEFT-padded so the last step is every name's last letter."""
    ids = torch.full((len(rows), max_len), PAD, dtype=torch.long)
    for i, (_, name) in enumerate(rows):
        codes = [chars.get(c, len(chars) + 1) for c in name.lower()][-max_len:]
        ids[i, max_len - len(codes) :] = torch.tensor(codes, dtype=torch.long)
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


def parse_args(argv=None):
    p = common.make_parser(__doc__)
    p.add_argument("--data", default=DEFAULT_DATA, help="TSV file: label<TAB>name")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="expected batch size")
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    common.add_privacy_args(p, sigma=1.5)
    p.add_argument("--accountant", default="prv", choices=["prv", "rdp", "gdp"])
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--max-len", type=int, default=12, help="names are cut to their last letters")
    p.add_argument("--disable-dp", action="store_true")
    common.add_run_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args)
    torch.manual_seed(args.seed)

    rows = common.read_tsv(args.data)
    n_test = len(rows) // 5
    # Ids 1.. for letters seen in training, len+1 for unseen ones, 0 for padding.
    letters = sorted({c for _, name in rows[n_test:] for c in name.lower()})
    chars = {c: i + 1 for i, c in enumerate(letters)}
    labels = {name: i for i, name in enumerate(sorted({label for label, _ in rows}))}
    train_x, train_y = encode(rows[n_test:], chars, labels, args.max_len)
    test_x, test_y = encode(rows[:n_test], chars, labels, args.max_len)
    print(
        f"{len(train_y)} training / {len(test_y)} test names, {len(chars)} letters, "
        f"labels {sorted(labels, key=labels.get)}"
    )
    train_loader = DataLoader(
        TensorDataset(train_x, train_y), batch_size=args.batch_size, shuffle=True
    )
    test_loader = DataLoader(TensorDataset(test_x, test_y), batch_size=256)

    model = CharLSTM(len(chars) + 2, len(labels), hidden=args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    criterion = nn.CrossEntropyLoss()
    privacy_engine = None
    if not args.disable_dp:
        from opacus import PrivacyEngine

        privacy_engine = PrivacyEngine(accountant=args.accountant)
        model, optimizer, train_loader = privacy_engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=train_loader,
            noise_multiplier=args.sigma,
            max_grad_norm=args.max_grad_norm,
        )

    start, steps, eps = time.time(), 0, float("nan")
    show_bar = common.bars_enabled(args)
    # the bar shows the ε spent so far (not the previous epoch's)
    live_eps = (
        (lambda: privacy_engine.get_epsilon(args.delta))
        if privacy_engine is not None
        else float("nan")
    )
    for epoch in range(1, args.epochs + 1):
        stats, steps = common.train_epoch(
            model,
            optimizer,
            criterion,
            train_loader,
            desc=f"epoch {epoch}/{args.epochs}",
            show_bar=show_bar,
            eps=live_eps,
            steps=steps,
            max_steps=args.max_steps,
        )
        if privacy_engine is not None:
            eps = privacy_engine.get_epsilon(args.delta)
        if epoch % 5 == 0 or epoch == args.epochs or args.max_steps is not None:
            print(
                f"epoch {epoch:3d} | loss {stats.loss():.4f} | train acc "
                f"{stats.accuracy:.3f} | test acc {common.evaluate(model, test_loader):.3f}"
                f" | eps {eps:.2f}"
            )
        if common.out_of_steps(steps, args.max_steps):
            break
    test_acc = common.evaluate(model, test_loader)
    privacy = (
        f"eps {eps:.2f}, delta {args.delta}" if privacy_engine is not None else "without privacy"
    )
    print(
        f"RESULT: test accuracy {test_acc:.3f} ({len(labels)} classes) {privacy}, "
        f"{steps} steps in {time.time() - start:.1f}s"
    )
    return test_acc, eps


if __name__ == "__main__":
    main()

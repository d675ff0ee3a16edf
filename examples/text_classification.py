#!/usr/bin/env python
"""DP-SGD text classification with a small transformer built on ``DPMultiheadAttention``.

The model puts ``opacus.layers.DPMultiheadAttention(batch_first=True)`` next to ordinary
``nn.Linear``/``nn.Embedding``/``nn.LayerNorm`` layers and is trained with
``PrivacyEngine.make_private(..., batch_first=True)``: the combination whose per-sample gradients
Opacus 1.6 got wrong (its attention projections saw the sequence length as the batch). It
classifies the topic of the short sentences shipped in ``examples/data/sentences.tsv``.
``--layout seq-first`` runs the same model on ``(seq, batch)`` tensors with ``batch_first=False``.
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

DEFAULT_DATA = os.path.join(HERE, "data", "sentences.tsv")
PAD, UNK = 0, 1


def encode(rows, vocab=None, labels=None, max_len=None):
    """Word ids ``(N, max_len)`` padded with ``PAD``, label ids ``(N,)``, and the vocabularies.

    The vocabulary is built from the rows given (pass the training split) so that test words
    unseen in training map to ``UNK``.
    """
    tokens = [text.lower().split() for _, text in rows]
    if vocab is None:
        words = sorted({w for sentence in tokens for w in sentence})
        vocab = {w: i + 2 for i, w in enumerate(words)}
    if labels is None:
        labels = {name: i for i, name in enumerate(sorted({label for label, _ in rows}))}
    max_len = max_len or max(len(s) for s in tokens)
    ids = torch.full((len(rows), max_len), PAD, dtype=torch.long)
    for i, sentence in enumerate(tokens):
        sentence = [vocab.get(w, UNK) for w in sentence][:max_len]
        ids[i, : len(sentence)] = torch.tensor(sentence, dtype=torch.long)
    y = torch.tensor([labels[label] for label, _ in rows], dtype=torch.long)
    return ids, y, vocab, labels, max_len


class TinyTransformer(nn.Module):
    """One pre-norm transformer block and a linear head on the mean of the unpadded positions.

    Works in both layouts: ``batch_first=True`` takes word ids ``(N, L)``, ``False`` takes
    ``(L, N)``. Every layer sees the batch on the same dimension (the one the privacy engine is
    told about), including the head, which is applied to a length-1 sequence.
    """

    def __init__(self, vocab_size, num_classes, max_len, dim=32, heads=4, batch_first=True):
        super().__init__()
        from opacus.layers import DPMultiheadAttention

        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.position = nn.Embedding(max_len, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DPMultiheadAttention(dim, heads, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids):
        seq_dim = 1 if self.batch_first else 0
        positions = torch.arange(ids.shape[seq_dim], device=ids.device)
        positions = positions.unsqueeze(0) if self.batch_first else positions.unsqueeze(1)
        h = self.embed(ids) + self.position(positions.expand_as(ids))
        padding = ids == PAD  # (N, L) or (L, N)
        key_padding_mask = padding if self.batch_first else padding.t()
        x = self.norm1(h)
        h = h + self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        h = h + self.ff(self.norm2(h))
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(seq_dim, keepdim=True) / keep.sum(seq_dim, keepdim=True)
        return self.head(pooled).squeeze(seq_dim)


def parse_args(argv=None):
    p = common.make_parser(__doc__)
    p.add_argument("--data", default=DEFAULT_DATA, help="TSV file: label<TAB>sentence")
    p.add_argument("--layout", default="batch-first", choices=["batch-first", "seq-first"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128, help="expected batch size")
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    common.add_privacy_args(p, sigma=1.5)
    p.add_argument("--accountant", default="prv", choices=["prv", "rdp", "gdp"])
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--disable-dp", action="store_true")
    common.add_run_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args)
    torch.manual_seed(args.seed)
    batch_first = args.layout == "batch-first"

    rows = common.read_tsv(args.data)
    n_test = len(rows) // 5
    train_ids, train_y, vocab, labels, max_len = encode(rows[n_test:])
    test_ids, test_y, *_ = encode(rows[:n_test], vocab, labels, max_len)
    print(
        f"{len(train_y)} training / {len(test_y)} test sentences, {len(vocab)} words, "
        f"labels {sorted(labels, key=labels.get)}"
    )
    train_loader = DataLoader(
        TensorDataset(train_ids, train_y), batch_size=args.batch_size, shuffle=True
    )
    test_loader = DataLoader(TensorDataset(test_ids, test_y), batch_size=256)

    model = TinyTransformer(
        len(vocab) + 2, len(labels), max_len, args.dim, args.heads, batch_first=batch_first
    )
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
            batch_first=batch_first,
        )

    start, steps, eps = time.time(), 0, float("nan")
    show_bar = common.bars_enabled(args)
    # the bar shows the ε spent so far (not the previous epoch's)
    live_eps = (
        (lambda: privacy_engine.get_epsilon(args.delta))
        if privacy_engine is not None
        else float("nan")
    )
    # the loaders yield (N, L) word ids; the seq-first model takes (L, N)
    prepare = None if batch_first else torch.t
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
            prepare=prepare,
        )
        if privacy_engine is not None:
            eps = privacy_engine.get_epsilon(args.delta)
        if epoch % 5 == 0 or epoch == args.epochs or args.max_steps is not None:
            print(
                f"epoch {epoch:3d} | loss {stats.loss():.4f} | train acc "
                f"{stats.accuracy:.3f} | test acc "
                f"{common.evaluate(model, test_loader, prepare):.3f} | eps {eps:.2f}"
            )
        if common.out_of_steps(steps, args.max_steps):
            break
    test_acc = common.evaluate(model, test_loader, prepare)
    privacy = (
        f"eps {eps:.2f}, delta {args.delta}" if privacy_engine is not None else "without privacy"
    )
    print(
        f"RESULT: test accuracy {test_acc:.3f} ({len(labels)} classes) {privacy}, "
        f"layout {args.layout}, {steps} steps in {time.time() - start:.1f}s"
    )
    return test_acc, eps


if __name__ == "__main__":
    main()

"""The models timed by ``benchmarks/run.py``, each with a batch maker.

A ``Workload`` bundles a model factory, a function ``make_batch(batch_size) -> (x, y)`` and the
layout (``batch_first``) the DP wrapper must be told about.  Sizes follow the issue: an MLP
256-512-512-10, a small CNN on 32x32 images, ``Embedding(5000, 64)`` + ``Linear`` on token
sequences, a ``DPLSTM`` classifier, a transformer block on ``DPMultiheadAttention`` in both
layouts, a 4-layer Linear/Embedding model on long sequences for the memory target, and a deep
narrow residual stack with 1,026 parameter tensors (issue 17: per-step cost linear in the number
of tensors).
"""

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn

from opacus.layers import DPLSTM, DPMultiheadAttention


@dataclass
class Workload:
    """A benchmark model: ``build(size)`` -> module, ``make_batch(batch, size)`` -> (x, y)."""

    name: str
    build: Callable[[str], nn.Module]
    make_batch: Callable[[int, str], Tuple[torch.Tensor, torch.Tensor]]
    batch_first: bool = True
    description: str = ""


def _mlp(size: str) -> nn.Module:
    hidden = 512 if size == "full" else 16
    return nn.Sequential(
        nn.Linear(256, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def _cnn(size: str) -> nn.Module:
    c = 16 if size == "full" else 2
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * c * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


class TokenClassifier(nn.Module):
    """``Embedding(vocab, dim)`` -> mean over the sequence -> ``Linear(dim, 10)``."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(tokens).mean(dim=1))


def _seq_len(size: str) -> int:
    return 32 if size == "full" else 4


def _vocab(size: str) -> int:
    return 5000 if size == "full" else 50


class LSTMClassifier(nn.Module):
    """``DPLSTM`` over a (B, T, 32) sequence; the last hidden state -> ``Linear(hidden, 10)``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.lstm = DPLSTM(32, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class AttentionBlock(nn.Module):
    """Pre-norm transformer block (``DPMultiheadAttention`` + MLP), mean-pooled, -> 10 classes."""

    def __init__(self, dim: int, heads: int, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DPMultiheadAttention(dim, heads, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        # The head runs per token so every layer sees the batch on the wrapper's batch dim.
        return self.head(x).mean(dim=1 if self.batch_first else 0)


class LongSequenceModel(nn.Module):
    """4 layers: ``Embedding`` -> ``Linear`` -> ``Linear`` -> ``Linear``, per token, mean-pooled."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.fc3 = nn.Linear(dim, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.embedding(tokens)))
        h = torch.relu(self.fc2(h))
        return self.fc3(h).mean(dim=1)


class ManyTensors(nn.Module):
    """``depth`` residual blocks ``x + tanh(Linear(width, width)(x))`` and a ``Linear`` head:
    ``2 * depth + 2`` parameter tensors of a few dozen elements each, so that a DP step's cost
    is dominated by its per-tensor loops (noise, clipping, scaling, zero_grad)."""

    def __init__(self, depth: int, width: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def _labels(batch: int) -> torch.Tensor:
    return torch.randint(0, 10, (batch,))


def _attention_batch(batch_first: bool):
    def make(batch: int, size: str):
        t, d = (16, 64) if size == "full" else (3, 8)
        x = torch.randn(batch, t, d)
        return (x if batch_first else x.transpose(0, 1).contiguous()), _labels(batch)

    return make


WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "mlp",
            _mlp,
            lambda b, s: (torch.randn(b, 256), _labels(b)),
            description="MLP 256-512-512-10",
        ),
        Workload(
            "cnn",
            _cnn,
            lambda b, s: (torch.randn(b, 3, 32, 32), _labels(b)),
            description="2 conv + 2 linear on 3x32x32",
        ),
        Workload(
            "embedding",
            lambda s: TokenClassifier(_vocab(s), 64 if s == "full" else 8),
            lambda b, s: (torch.randint(0, _vocab(s), (b, _seq_len(s))), _labels(b)),
            description="Embedding(5000, 64) + Linear(64, 10), 32 tokens",
        ),
        Workload(
            "lstm",
            lambda s: LSTMClassifier(64 if s == "full" else 4),
            lambda b, s: (torch.randn(b, 16 if s == "full" else 3, 32), _labels(b)),
            description="DPLSTM(32, 64), 16 steps + Linear",
        ),
        Workload(
            "attention_bf",
            lambda s: AttentionBlock(*((64, 4) if s == "full" else (8, 2)), True),
            _attention_batch(True),
            batch_first=True,
            description="DPMultiheadAttention block, batch_first=True, 16 tokens, dim 64",
        ),
        Workload(
            "attention_sf",
            lambda s: AttentionBlock(*((64, 4) if s == "full" else (8, 2)), False),
            _attention_batch(False),
            batch_first=False,
            description="DPMultiheadAttention block, sequence-first, 16 tokens, dim 64",
        ),
        Workload(
            "longseq",
            lambda s: LongSequenceModel(_vocab(s), 64 if s == "full" else 8),
            lambda b, s: (torch.randint(0, _vocab(s), (b, 1024 if s == "full" else 6)), _labels(b)),
            description="Embedding(5000, 64) + 3 Linear, 1024 tokens (memory target)",
        ),
        Workload(
            "many_tensors",
            lambda s: ManyTensors(512 if s == "full" else 8),
            lambda b, s: (torch.randn(b, 8), _labels(b)),
            description="512 residual Linear(8, 8) blocks + head: 1,026 parameter tensors",
        ),
    ]
}

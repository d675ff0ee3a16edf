"""The models timed by ``benchmarks/run.py``, each with a batch maker.

A ``Workload`` bundles a model factory, a function ``make_batch(batch_size) -> (x, y)`` and the
layout (``batch_first``) the DP wrapper must be told about.  Sizes follow the issue: an MLP
256-512-512-10, a small CNN on 32x32 images, ``Embedding(5000, 64)`` + ``Linear`` on token
sequences, a ``DPLSTM`` classifier, a transformer block on ``DPMultiheadAttention`` in both
layouts, a 4-layer Linear/Embedding model on long sequences for the memory target, and a deep
narrow residual stack with 1,026 parameter tensors (issue 17: per-step cost linear in the number
of tensors), and (issue 18; skipped without ``transformers``/``peft``) a GPT-2-style causal LM,
untied, with LoRA, and at sequence 512.
"""

import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from opacus.layers import DPLSTM, DPMultiheadAttention

# Through PrivacyEngine.make_private; "*_direct": GradSampleModule(+FastGradientClipping) and
# DPOptimizer(FastGradientClipping) built by hand, as Opacus's own examples do.
ENGINE_MODES = ("hooks", "functorch", "ghost")
DIRECT_MODES = ("hooks_direct", "ghost_direct")
ALL_MODES = ENGINE_MODES + DIRECT_MODES


@dataclass
class Workload:
    """A benchmark model: ``build(size)`` -> module, ``make_batch(batch, size)`` -> (x, y)."""

    name: str
    build: Callable[[str], nn.Module]
    make_batch: Callable[[int, str], Tuple[torch.Tensor, torch.Tensor]]
    batch_first: bool = True
    description: str = ""
    # Modes this workload is timed in.
    modes: Tuple[str, ...] = ENGINE_MODES
    # Batch size of the workload (None: the runner's ``--batch-size``).
    batch_size: Optional[int] = None
    # Optional packages the model needs: without them its rows are skipped.
    requires: Tuple[str, ...] = ()
    # At most this many timed repeats (long steps).
    max_repeats: Optional[int] = None

    def missing(self) -> Tuple[str, ...]:
        """The packages of ``requires`` that are not installed."""
        return tuple(r for r in self.requires if importlib.util.find_spec(r) is None)


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


# GPT-2-style causal LM (issue 18): 4 layers, width 256, 4 heads, vocabulary 4096, sequence 128,
# batch 8, random init from a config (no download); dropout off so that the DP and non-private
# steps compute the same thing. Tiny sizes for --quick.
LM_FULL = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=4096)
LM_TINY = dict(n_layer=1, n_embd=8, n_head=2, vocab_size=50)


class CausalLM(nn.Module):
    """``transformers.GPT2LMHeadModel`` from a config; returns the logits ``(B, T, V)``; the
    runner flattens them to ``(B*T, V)`` for the loss, as Hugging Face models do.

    Position ids are passed with the batch dimension (``(B, T)``): GPT-2's default ``(1, T)``
    would show the position embedding a batch of 1, which the per-sample hooks refuse.
    """

    def __init__(self, seq_len: int, size: str, lora: bool = False, tie: bool = True):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        dims = LM_FULL if size == "full" else LM_TINY
        cfg = GPT2Config(
            **dims,
            n_positions=seq_len,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=tie,
        )
        lm = GPT2LMHeadModel(cfg)
        if lora:
            from peft import LoraConfig, get_peft_model

            lm = get_peft_model(
                lm,
                LoraConfig(
                    r=8,
                    lora_alpha=16,
                    lora_dropout=0.0,
                    target_modules=["c_attn", "c_proj"],
                    fan_in_fan_out=True,
                ),
            )
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return self.lm(input_ids=ids, position_ids=pos, use_cache=False).logits


def _lm_batch(seq_len: int):
    def make(batch: int, size: str):
        vocab = (LM_FULL if size == "full" else LM_TINY)["vocab_size"]
        t = seq_len if size == "full" else 6
        return torch.randint(0, vocab, (batch, t)), torch.randint(0, vocab, (batch, t))

    return make


def _lm(seq_len: int, **kw):
    return lambda size: CausalLM(seq_len if size == "full" else 6, size, **kw)


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
            modes=ALL_MODES,
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
            modes=ALL_MODES,
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
        Workload(
            "gpt2",
            _lm(128),
            _lm_batch(128),
            modes=("hooks", "ghost", "functorch"),
            batch_size=8,
            requires=("transformers",),
            description="GPT-2-style LM (4 layers, width 256, vocab 4096, tied), seq 128, batch 8",
        ),
        Workload(
            "gpt2_untied",
            _lm(128, tie=False),
            _lm_batch(128),
            modes=("hooks", "ghost"),
            batch_size=8,
            requires=("transformers",),
            description="the same LM with an untied lm_head",
        ),
        Workload(
            "gpt2_lora",
            _lm(128, lora=True),
            _lm_batch(128),
            modes=("hooks", "ghost"),
            batch_size=8,
            requires=("transformers", "peft"),
            description="the LM with peft LoRA r=8 on c_attn and c_proj (base frozen)",
        ),
        Workload(
            "gpt2_seq512",
            _lm(512),
            _lm_batch(512),
            modes=("hooks", "ghost"),
            batch_size=8,
            requires=("transformers",),
            max_repeats=5,
            description="the LM at sequence 512 (ghost peak-memory target)",
        ),
    ]
}

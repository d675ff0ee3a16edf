"""End to end: DP-SGD on an attention model, the scenario the original Opacus got wrong.

With ``DPMultiheadAttention(batch_first=True)`` next to an ``nn.Linear`` head, the original
library produced per-sample gradients with the sequence length as batch for the attention's
projections: ``make_private`` training failed in the optimizer (mismatched sizes at
``torch.stack``) or, when sizes happened to agree, clipped mixtures of samples.
"""

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.layers import DPMultiheadAttention
from opacus.optimizers import DPOptimizer
from tests.oracle import brute_force_grad_samples

EMBED, SEQ, CLASSES = 8, 7, 3


class AttentionClassifier(nn.Module):
    """Self-attention over a (N, L, E) batch, linear head per position, mean-pooled logits.

    With ``batch_first=False`` the model transposes to (L, N, E) itself, so every layer sees the
    batch on dim 1, as ``make_private(..., batch_first=False)`` promises the hooks.
    """

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.attn = DPMultiheadAttention(EMBED, 2, batch_first=batch_first, add_bias_kv=True)
        self.head = nn.Linear(EMBED, CLASSES)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.attn(x, x, x)
        logits = self.head(out)
        return logits.mean(dim=1 if self.batch_first else 0)


def dataset(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, SEQ, EMBED, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)
    )


@pytest.mark.parametrize("batch_first", [True, False])
def test_make_private_trains_with_true_per_sample_gradients(batch_first):
    torch.manual_seed(0)
    model = AttentionClassifier(batch_first)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data_loader = DataLoader(dataset(), batch_size=16)
    engine = PrivacyEngine()
    model, optimizer, data_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        batch_first=batch_first,
    )
    criterion = nn.CrossEntropyLoss()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = 0
    for x, y in data_loader:
        if len(x) == 0:
            continue
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        for name, p in model.named_parameters():
            assert p.grad_sample.shape == (len(x), *p.shape), name
        optimizer.step()
        steps += 1
    assert steps >= 3
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    epsilon = engine.get_epsilon(delta=1e-5)
    assert epsilon > 0 and math.isfinite(epsilon)


def test_dp_optimizer_update_is_clipped_sum_of_true_per_sample_gradients():
    """Noise 0: the update equals sum_i clip(g_i) / N with g_i from the brute-force oracle."""
    torch.manual_seed(0)
    N, max_grad_norm, lr = 5, 0.05, 1.0
    model = AttentionClassifier(batch_first=True).double()
    x, y = dataset(N)[:]
    x = x.double()
    criterion = nn.CrossEntropyLoss()
    per_sample = brute_force_grad_samples(model, [x], loss_fn=criterion, targets=y, batch_dim=0)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any(), "the test should exercise clipping"
    expected = {n: torch.einsum("i,i...->...", factors, g) / N for n, g in per_sample.items()}

    gsm = GradSampleModule(model, batch_first=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=lr),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=N,
    )
    optimizer.zero_grad()
    criterion(gsm(x), y).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            (before[name] - p.detach()) / lr,
            expected[name],
            atol=1e-10,
            rtol=1e-7,
            msg=lambda m: f"{name}: {m}",
        )

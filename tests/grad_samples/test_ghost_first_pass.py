"""Ghost clipping's norm pass asks autograd only for gradients below the hooked layers' hook nodes
(no weight gradient): norms and the clipped sum must still equal the brute-force oracle."""

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.layers import DPLSTM, DPMultiheadAttention
from opacus.utils.fast_gradient_clipping_utils import double_backward
from tests.grad_samples.ghost_stubs import BoundOnly
from tests.oracle import brute_force_grad_samples

MAX_GRAD_NORM = 0.05  # small enough that every sample is clipped


class _ReusedFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 5)
        self.l2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(torch.tanh(self.l1(x)))))


class _Attention(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.attn = DPMultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])


class _Lstm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = DPLSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def _frozen(first: bool):
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0 if first else 2].requires_grad_(False)
    return model


def _case(name):
    """(model, input, batch_dim, batch_first)."""
    torch.manual_seed(0)
    b = 4
    if name == "mlp":
        return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), torch.randn(b, 5), 0
    if name == "embedding_seq":
        model = nn.Sequential(nn.Embedding(11, 5), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        return model, torch.randint(0, 11, (b, 6)), 0
    if name in ("attention_bf", "attention_tf"):
        bf = name == "attention_bf"
        x = torch.randn(b, 5, 8) if bf else torch.randn(5, b, 8)
        return _Attention(bf), x, 0 if bf else 1
    if name == "lstm":
        return _Lstm(), torch.randn(b, 3, 4), 0
    if name == "frozen_first":
        return _frozen(True), torch.randn(b, 5), 0
    if name == "frozen_middle":
        return _frozen(False), torch.randn(b, 5), 0
    if name == "reused_first":
        return _ReusedFirst(), torch.randn(b, 5), 0
    if name == "input_requires_grad":
        return _frozen(False), torch.randn(b, 5).requires_grad_(), 0
    raise ValueError(name)


CASES = [
    "mlp",
    "embedding_seq",
    "attention_bf",
    "attention_tf",
    "lstm",
    "frozen_first",
    "frozen_middle",
    "reused_first",
    "input_requires_grad",
]


def _sample_loss(output, batch_dim):
    dims = tuple(d for d in range(output.dim()) if d != batch_dim)
    return output.sin().sum(dim=dims)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_norms_and_clipped_sum_match_oracle(name, loss_reduction):
    model, x, batch_dim = _case(name)
    per_sample = brute_force_grad_samples(
        model, x, batch_dim=batch_dim, loss_fn=lambda out: _sample_loss(out, batch_dim).sum()
    )
    names = list(per_sample)
    norms = torch.stack([per_sample[n].flatten(1).norm(dim=1) for n in names]).norm(dim=0)
    coef = (MAX_GRAD_NORM / (norms + 1e-6)).clamp(max=1.0)
    assert (coef < 1).all()

    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=batch_dim == 0, loss_reduction=loss_reduction
    )
    params = dict(model.named_parameters())
    first_pass_grads = []
    for n in names:
        params[n].register_hook(
            lambda g, n=n: first_pass_grads.append(n) if gsm.hooks_enabled else None
        )
    loss = _sample_loss(gsm(x), batch_dim)
    double_backward(gsm, BoundOnly(MAX_GRAD_NORM), loss)

    # The norm pass computed no parameter gradient: the weight branches were pruned.
    assert first_pass_grads == []
    torch.testing.assert_close(gsm.get_norm_sample(), norms, rtol=1e-4, atol=1e-6)
    for n in names:
        expected = torch.einsum("b,b...->...", coef, per_sample[n])
        torch.testing.assert_close(params[n].grad, expected, rtol=1e-4, atol=1e-6)


def test_fallback_when_two_forwards_precede_one_backward():
    """Calls captured by an earlier forward have no anchors: the old path (parameter gradients)
    is taken, and the norms still cover both forwards."""
    model, x, _ = _case("mlp")
    gsm = GradSampleModuleFastGradientClipping(model)
    first = gsm(x)
    assert gsm.first_pass_anchors()
    out = gsm(x)
    assert gsm.first_pass_anchors() is None  # the first forward's calls are still pending
    del first, out
    # A forward whose output is dropped can never be differentiated: its calls are forgotten.
    gsm(x)
    out = gsm(x)
    assert gsm.first_pass_anchors()
    del out

"""Ghost clipping's per-sample losses: each sample's loss is the criterion on that sample alone.

Behaviour contract cluster 15 (per-sample losses with extra dims are reduced to one per sample,
with a logged warning) and issue 16 item 7 (padded sequences: ``ignore_index`` labels are left
out of each sample's mean).  Oracle: a loop over the samples with the torch criterion itself and
``torch.autograd.grad`` (tests.oracle), clipped sample by sample.
"""

import logging

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from tests.oracle import brute_force_grad_samples


def _clipped_sum(per_sample: dict, clip: float) -> dict:
    """Sample by sample: the whole gradient clipped to ``clip``, then added up."""
    flat = torch.cat([g.flatten(1) for g in per_sample.values()], dim=1)
    coef = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", coef, g) for n, g in per_sample.items()}


def _setup(model, clip, loss_reduction="mean", batch=3):
    gsm = GradSampleModuleFastGradientClipping(
        model, loss_reduction=loss_reduction, max_grad_norm=123.0
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=batch,
        loss_reduction=loss_reduction,
    )
    return gsm, optimizer


class _EmbeddingClassifier(nn.Module):
    """Outputs ``(B, 2, 1)``: two classes and a trailing dim of 1, as in the contract's test."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 2)

    def forward(self, x):
        return self.emb(x).transpose(1, 2)  # (B, 1) indices -> (B, 2, 1) logits


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_extra_dims_are_reduced_and_clipped_per_sample(loss_reduction, caplog):
    torch.manual_seed(0)
    model = _EmbeddingClassifier().double()
    x = torch.tensor([[1], [4], [7]])
    y = torch.tensor([[0], [1], [1]])
    clip = 0.01  # every sample is clipped: unclipped gradients would be far larger
    ce = nn.CrossEntropyLoss()
    per_sample = brute_force_grad_samples(model, x, loss_fn=ce, targets=y)
    expected = _clipped_sum(per_sample, clip)
    gsm, optimizer = _setup(model, clip, loss_reduction)
    criterion = DPLossFastGradientClipping(gsm, optimizer, ce, loss_reduction)
    with caplog.at_level(logging.WARNING):
        loss = criterion(gsm(x), y)
        criterion(gsm(x), y)  # logged once per criterion
    warnings = [r for r in caplog.records if "reduced to one" in r.getMessage()]
    assert len(warnings) == 1 and "(3, 1)" in warnings[0].getMessage()
    assert loss.loss_per_sample.shape == (3,)
    loss.backward()
    grad = model.emb.weight.grad
    torch.testing.assert_close(grad, expected["emb.weight"], rtol=1e-6, atol=1e-12)
    optimizer.step()  # noise 0: the released update is the clipped sum (/ B for "mean")
    scale = 3 if loss_reduction == "mean" else 1
    torch.testing.assert_close(
        model.emb.weight.grad, expected["emb.weight"] / scale, rtol=1e-6, atol=1e-12
    )


class _TinyLM(nn.Module):
    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(self.emb(x))))  # (B, T, V)


def _padded_batch(lengths, T=5, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (len(lengths), T), generator=g)
    y = torch.randint(0, vocab, (len(lengths), T), generator=g)
    for i, n in enumerate(lengths):
        y[i, n:] = -100  # padding: ignored by the criterion
    return x, y


def _criteria():
    w = torch.linspace(0.5, 2.0, 11, dtype=torch.float64)
    return {
        "plain": nn.CrossEntropyLoss(ignore_index=-100),
        "weighted": nn.CrossEntropyLoss(weight=w, ignore_index=-100),
        "smoothed": nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.1),
    }


def _sample_loss(criterion, flatten):
    def loss(out, target):  # out (1, T, V), target (1, T): that one sample's own loss
        if flatten:
            return criterion(out.reshape(-1, out.shape[-1]), target.reshape(-1))
        return criterion(out.transpose(1, 2), target)

    return loss


@pytest.mark.parametrize("name", ["plain", "weighted", "smoothed"])
@pytest.mark.parametrize("flatten", [True, False])
def test_padded_tokens_are_left_out_of_each_samples_loss(name, flatten):
    torch.manual_seed(1)
    model = _TinyLM().double()
    x, y = _padded_batch([5, 2, 3, 1])
    criterion = _criteria()[name]
    own = _sample_loss(criterion, flatten)
    expected_losses = torch.stack([own(model(x[i : i + 1]), y[i : i + 1]) for i in range(4)])
    clip = 0.05
    expected = _clipped_sum(brute_force_grad_samples(model, x, loss_fn=own, targets=y), clip)
    gsm, optimizer = _setup(model, clip, batch=4)
    dp_criterion = DPLossFastGradientClipping(gsm, optimizer, criterion)
    out = gsm(x)
    if flatten:
        loss = dp_criterion(out.reshape(-1, out.shape[-1]), y.reshape(-1), shape=(4, 5))
    else:
        loss = dp_criterion(out.transpose(1, 2), y)
    torch.testing.assert_close(loss.loss_per_sample.detach(), expected_losses.detach())
    assert loss.item() == pytest.approx(expected_losses.mean().item())
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-6, atol=1e-12, msg=n)


def test_a_sample_with_only_padding_has_loss_and_gradient_zero():
    torch.manual_seed(2)
    model = _TinyLM().double()
    x, y = _padded_batch([3, 0, 5])
    gsm, optimizer = _setup(model, 1e3)
    loss = DPLossFastGradientClipping(gsm, optimizer, nn.CrossEntropyLoss())(
        gsm(x).transpose(1, 2), y
    )
    assert loss.loss_per_sample[1].item() == 0.0
    loss.backward()
    own = _sample_loss(nn.CrossEntropyLoss(), flatten=False)
    kept = torch.tensor([0, 2])
    expected = brute_force_grad_samples(model, x[kept], loss_fn=own, targets=y[kept])
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, expected[n].sum(0), rtol=1e-6, atol=1e-12)


def test_criterion_sum_reduction_sums_each_samples_tokens():
    torch.manual_seed(3)
    model = _TinyLM().double()
    x, y = _padded_batch([4, 2])
    criterion = nn.CrossEntropyLoss(reduction="sum")
    gsm, optimizer = _setup(model, 1.0, batch=2)
    loss = DPLossFastGradientClipping(gsm, optimizer, criterion)(gsm(x).transpose(1, 2), y)
    expected = torch.stack(
        [criterion(model(x[i : i + 1]).transpose(1, 2), y[i : i + 1]) for i in range(2)]
    )
    torch.testing.assert_close(loss.loss_per_sample.detach(), expected.detach())


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
)
def test_hypothesis_per_sample_losses_match_the_criterion_alone(lengths, seed):
    torch.manual_seed(seed)
    model = _TinyLM().double()
    x, y = _padded_batch(lengths, T=6, seed=seed)
    criterion = nn.CrossEntropyLoss()
    gsm, optimizer = _setup(model, 1.0, batch=len(lengths))
    loss = DPLossFastGradientClipping(gsm, optimizer, criterion)(gsm(x).transpose(1, 2), y)
    expected = torch.stack(
        [criterion(model(x[i : i + 1]).transpose(1, 2), y[i : i + 1]) for i in range(len(lengths))]
    )
    torch.testing.assert_close(loss.loss_per_sample.detach(), expected.detach())
    gsm.remove_hooks()

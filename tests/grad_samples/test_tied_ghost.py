"""Ghost clipping of an ``nn.Embedding`` whose weight is a ``nn.Linear`` head's weight (GPT-2's
``wte`` / ``lm_head``): the shared weight's per-sample norm from the two ghost norms and their
cross term, and its clipped sum from both layers, against the brute-force per-sample oracle."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import double_backward
from tests.grad_samples.ghost_stubs import BoundOnly
from tests.oracle import brute_force_grad_samples


class _TiedLM(nn.Module):
    """ids -> wte -> tanh(fc) -> LayerNorm -> lm_head (weight = wte.weight) -> per-token logits.

    ``reuse_head`` calls the head twice (the materialised path); ``drop_embedding`` calls the
    embedding but does not use its output (its half of the shared gradient is 0)."""

    def __init__(self, vocab=7, dim=4, padding_idx=None, reuse_head=False, drop_embedding=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.pos = nn.Parameter(torch.randn(dim))
        self.reuse_head = reuse_head
        self.drop_embedding = drop_embedding

    def forward(self, ids):
        h = self.wte(ids)
        if self.drop_embedding:
            h = torch.zeros_like(h).detach() + self.pos
        h = self.norm(torch.tanh(self.fc(h)))
        logits = self.lm_head(h)
        if self.reuse_head:
            logits = logits + self.lm_head(h.flip(1))
        return logits


def _sample_loss(out):
    return out.sin().flatten(1).sum(dim=1)


def _oracle(model, x, max_grad_norm):
    per_sample = brute_force_grad_samples(model, x, loss_fn=lambda out: _sample_loss(out).sum())
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
    coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    sums = {n: torch.einsum("b,b...->...", coef, g) for n, g in per_sample.items()}
    return norms, sums


def _model(seed, **kwargs):
    torch.manual_seed(seed)
    model = _TiedLM(**kwargs).double()
    model.pos.requires_grad_(False)  # no layer of its own: frozen
    return model


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.integers(1, 5),
    padding=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    ratio=st.sampled_from([0.0, math.inf]),
    max_grad_norm=st.sampled_from([0.05, 1e3]),
)
def test_tied_weight_norms_and_clipped_sum_match_oracle(
    batch, seq, padding, reduction, ratio, max_grad_norm
):
    model = _model(batch * 10 + seq, padding_idx=1 if padding else None)
    x = torch.randint(0, 7, (batch, seq))
    expected_norms, expected = _oracle(model, x, max_grad_norm)
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction=reduction)
    # Both tied halves take the ghost path (no per-sample gradient of the shared weight).
    assert gsm.log_module_gradient_sample_mode(model.wte) == "ghost"
    assert gsm.log_module_gradient_sample_mode(model.lm_head) == "ghost"
    gsm.max_book_keeping_ratio = ratio
    autograd_grads = []
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(lambda g: autograd_grads.append(g))
    loss = _sample_loss(gsm(x))
    double_backward(gsm, BoundOnly(max_grad_norm), loss)
    # Book-keeping (ratio inf) forms every clipped sum, the shared weight's included, in hooks.
    assert (len(autograd_grads) == 0) == (ratio == math.inf)
    torch.testing.assert_close(gsm.per_sample_gradient_norms, expected_norms, rtol=1e-8, atol=1e-10)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-8, atol=1e-10)
    gsm.remove_hooks()


@pytest.mark.parametrize("variant", ["reuse_head", "drop_embedding"])
@pytest.mark.parametrize("ratio", [0.0, math.inf])
def test_tied_weight_fallbacks_stay_exact(variant, ratio):
    """A head called twice materialises both halves' per-sample gradients of the shared
    weight; an embedding whose output the loss ignores leaves the head's norm alone."""
    model = _model(5, **{variant: True})
    x = torch.randint(0, 7, (3, 4))
    expected_norms, expected = _oracle(model, x, 0.05)
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="mean")
    gsm.max_book_keeping_ratio = ratio
    double_backward(gsm, BoundOnly(0.05), _sample_loss(gsm(x)))
    torch.testing.assert_close(gsm.per_sample_gradient_norms, expected_norms, rtol=1e-8, atol=1e-10)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-8, atol=1e-10)
    assert model.wte.weight.grad_sample is None  # only norms are kept, whatever the path
    gsm.remove_hooks()


def test_other_shared_weights_keep_the_materialised_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    gsm = GradSampleModuleFastGradientClipping(model)
    assert gsm.log_module_gradient_sample_mode(model[0]) == "grad_sampler"
    emb = _TiedLM()
    emb.wte.scale_grad_by_freq = True
    gsm = GradSampleModuleFastGradientClipping(emb)
    assert gsm.log_module_gradient_sample_mode(emb.wte) != "ghost"


def test_fsdp_hooks_keep_tied_weights_on_the_materialised_path():
    from opacus.grad_sample import GradSampleModuleFastGradientClippingFSDP

    model = _model(7)
    gsm = GradSampleModuleFastGradientClippingFSDP(model)
    assert gsm.log_module_gradient_sample_mode(model.wte) != "ghost"
    assert gsm.log_module_gradient_sample_mode(model.fc) == "ghost"
    x = torch.randint(0, 7, (3, 4))
    expected_norms, _ = _oracle(model, x, 0.05)
    double_backward(gsm, BoundOnly(0.05), _sample_loss(gsm(x)))
    torch.testing.assert_close(gsm.per_sample_gradient_norms, expected_norms, rtol=1e-8, atol=1e-10)

"""Fast gradient clipping: per-sample norms and clipping coefficients vs the brute-force oracle."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
    GradSampleModuleFastGradientClippingFSDP,
    GradSampleModuleFastGradientClippingTP,
)
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import create_norm_sample
from tests.oracle import brute_force_grad_samples


def _norms(per_sample: dict) -> torch.Tensor:
    return torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)


def _seq_model():
    return nn.Sequential(nn.Embedding(13, 6), nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))


def _backward(gsm, x, reduction):
    out = gsm(x)
    loss = out.sum() / x.shape[0] if reduction == "mean" else out.sum()
    loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("use_ghost_clipping", [True, False])
def test_norms_match_brute_force(reduction, use_ghost_clipping):
    torch.manual_seed(0)
    model = _seq_model()
    x = torch.randint(0, 13, (5, 7))
    expected = _norms(brute_force_grad_samples(model, x))
    gsm = GradSampleModuleFastGradientClipping(
        model, loss_reduction=reduction, use_ghost_clipping=use_ghost_clipping
    )
    _backward(gsm, x, reduction)
    torch.testing.assert_close(gsm.get_norm_sample(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gsm.per_sample_gradient_norms, expected, rtol=1e-4, atol=1e-5)
    # Norms only: no per-sample gradient is kept on the parameters.
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert all(p._norm_sample.shape == (5,) for p in model.parameters())


def test_ghost_path_is_used_for_layers_with_a_norm_sampler():
    model = _seq_model()
    gsm = GradSampleModuleFastGradientClipping(model)
    assert gsm.log_module_gradient_sample_mode(model[1]) == "ghost"
    assert gsm.log_module_gradient_sample_mode(model[1], use_ghost_clipping=False) != "ghost"
    off = GradSampleModuleFastGradientClipping(_seq_model(), use_ghost_clipping=False)
    assert off._norm_sampler(off._module[1]) is None


def test_norm_sampler_is_called(monkeypatch):
    calls = []
    model = _seq_model()
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum")
    sampler = gsm.NORM_SAMPLERS[nn.Linear]

    def spy(layer, activations, backprops):
        calls.append(layer)
        return sampler(layer, activations, backprops)

    monkeypatch.setitem(gsm.NORM_SAMPLERS, nn.Linear, spy)
    _backward(gsm, torch.randint(0, 13, (3, 4)), "sum")
    assert calls == [model[3], model[1]]


@pytest.mark.parametrize("max_grad_norm", [0.05, 1.0, 1e3])
def test_clipping_coefficients(max_grad_norm):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(6, 4)
    norms = _norms(brute_force_grad_samples(model, x))
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=max_grad_norm)
    _backward(gsm, x, "mean")
    expected = torch.clamp(max_grad_norm / (norms + 1e-6), max=1.0)
    torch.testing.assert_close(gsm.get_clipping_coef(), expected, rtol=1e-4, atol=1e-6)
    gsm.max_grad_norm = 2 * max_grad_norm  # schedulers change it in place
    expected = torch.clamp(2 * max_grad_norm / (norms + 1e-6), max=1.0)
    torch.testing.assert_close(gsm.get_clipping_coef(), expected, rtol=1e-4, atol=1e-6)


def test_two_pass_clipped_sum():
    """Norm pass with hooks, re-weighted pass without: p.grad is the sum of clipped gradients."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(6, 4)
    per_sample = brute_force_grad_samples(model, x)
    max_grad_norm = 0.3
    coef = torch.clamp(max_grad_norm / (_norms(per_sample) + 1e-6), max=1.0)
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=max_grad_norm)
    loss_per_sample = gsm(x).sum(dim=1)
    loss_per_sample.mean().backward(retain_graph=True)
    c = gsm.get_clipping_coef()
    gsm.zero_grad()
    gsm.disable_hooks()
    (loss_per_sample * c).sum().backward()
    gsm.enable_hooks()
    for name, p in model.named_parameters():
        expected = torch.einsum("b,b...->...", coef, per_sample[name])
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)


def test_repeated_calls_and_tied_weights_use_materialised_norms():
    torch.manual_seed(3)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4)
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 9, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            h = self.fc(torch.tanh(self.fc(self.emb(x))))
            return self.head(h)

    model = Model()
    x = torch.randint(0, 9, (5, 3))
    expected = _norms(brute_force_grad_samples(model, x))
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum")
    _backward(gsm, x, "sum")
    torch.testing.assert_close(gsm.get_norm_sample(), expected, rtol=1e-4, atol=1e-5)


def test_hooks_only_variant_and_stale_norms():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    hooks = GradSampleHooksFastGradientClipping(model, loss_reduction="sum", max_grad_norm=1.0)
    with pytest.raises(ValueError, match="no per-sample gradient norms"):
        hooks.get_norm_sample()
    for batch in (4, 2):
        x = torch.randn(batch, 3)
        expected = _norms(brute_force_grad_samples(model, x))
        hooks.disable_hooks()  # the oracle's own passes must not record norms
        model.zero_grad()
        hooks.enable_hooks()
        model(x).sum().backward()
        torch.testing.assert_close(hooks.get_norm_sample(), expected, rtol=1e-4, atol=1e-5)
    hooks.cleanup()
    assert not any(hasattr(p, "_norm_sample") for p in model.parameters())


def test_zero_size_batch():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum")
    gsm(torch.randn(0, 3)).sum().backward()
    assert gsm.get_norm_sample().shape == (0,)
    assert gsm.get_clipping_coef().shape == (0,)


def test_scalar_parameter():
    class Temperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Parameter(torch.tensor(0.7))

        def forward(self, x):
            return x * self.t

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 2), Temperature())
    x = torch.randn(4, 3)
    per_sample = brute_force_grad_samples(model, x)
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum")
    _backward(gsm, x, "sum")
    expected = torch.stack([g.reshape(4, -1).norm(dim=1) for g in per_sample.values()])
    torch.testing.assert_close(gsm.get_norm_sample(), expected.norm(dim=0), rtol=1e-4, atol=1e-5)


def test_create_norm_sample_pads():
    p = nn.Parameter(torch.zeros(3))
    create_norm_sample(param=p, grad_sample=torch.tensor([1.0, 2.0]), max_batch_len=4)
    torch.testing.assert_close(p._norm_sample, torch.tensor([1.0, 2.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    "cls", [GradSampleModuleFastGradientClippingFSDP, GradSampleModuleFastGradientClippingTP]
)
def test_fsdp_and_tp_wrappers_on_an_unsharded_model(cls):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    expected = _norms(brute_force_grad_samples(model, x))
    gsm = cls(model, loss_reduction="sum", max_grad_norm=0.5)
    _backward(gsm, x, "sum")
    torch.testing.assert_close(gsm.get_norm_sample(), expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 5),
    seq=st.integers(1, 6),
    d=st.integers(1, 5),
    batch_first=st.booleans(),
)
def test_hypothesis_sequence_norms(batch, seq, d, batch_first):
    torch.manual_seed(batch + 7 * seq + 13 * d)
    model = nn.Sequential(nn.Linear(d, 3), nn.Tanh(), nn.Linear(3, 2))
    shape = (batch, seq, d) if batch_first else (seq, batch, d)
    x = torch.randn(*shape)
    expected = _norms(brute_force_grad_samples(model, x, batch_dim=0 if batch_first else 1))
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=batch_first, loss_reduction="sum")
    gsm(x).sum().backward()
    torch.testing.assert_close(gsm.get_norm_sample(), expected, rtol=1e-4, atol=1e-5)


def test_ghost_coefficients_and_norms_come_from_optimizers_clipping(monkeypatch):
    """Clip factors and whole-gradient norms are computed in one place
    (opacus.optimizers.clipping), for the optimizer and ghost clipping alike."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import clipping

    calls = []
    for name in ("clip_factors", "stack_norms"):
        original = getattr(clipping, name)

        def counting(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(clipping, name, counting)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=0.5, loss_reduction="sum")
    x = torch.randn(5, 3)
    gsm(x).sum().backward()
    coef = gsm.get_clipping_coef()
    assert calls == ["stack_norms", "clip_factors"]
    # closed form against brute-force per-sample gradients
    norms = []
    for i in range(5):
        grads = torch.autograd.grad(model(x[i : i + 1]).sum(), list(model.parameters()))
        norms.append(torch.sqrt(sum((g**2).sum() for g in grads)))
    expected = (0.5 / (torch.stack(norms) + 1e-6)).clamp(max=1.0)
    torch.testing.assert_close(coef, expected)

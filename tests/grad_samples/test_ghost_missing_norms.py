"""Ghost clipping refuses to clip when a layer's norm is missing from the norm pass (it would count
as zero and under-clip), and still matches the oracle when nothing is missing."""

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample import grad_sample_module_fast_gradient_clipping as fgc_module
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from tests.oracle import brute_force_grad_samples


def _setup(max_grad_norm=0.05):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    gsm = GradSampleModuleFastGradientClipping(
        model, max_grad_norm=max_grad_norm, loss_reduction="sum"
    )
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=6,
        loss_reduction="sum",
    )
    criterion = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), loss_reduction="sum")
    return model, gsm, opt, criterion


def _assert_clipped_sum(model, expected, max_grad_norm=0.05):
    """p.grad == the sum of the oracle's per-sample gradients clipped to ``max_grad_norm``."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()], dim=1).norm(dim=1)
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        clipped = torch.einsum("i,i...->...", factors, expected[name])
        torch.testing.assert_close(p.grad, clipped, atol=1e-6, rtol=1e-5)


def test_forward_without_backward_is_refused():
    _, gsm, opt, criterion = _setup()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    stray = gsm(torch.randn(6, 4))  # a kept forward whose activations are never consumed
    loss = criterion(gsm(x), y)
    with pytest.raises(RuntimeError, match="no per-sample norm"):
        loss.backward()
    del stray


def test_dropped_stray_forward_is_forgotten_and_the_step_matches_oracle():
    """An output nothing holds can never be differentiated: its calls contribute nothing."""
    model, gsm, opt, criterion = _setup()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    expected = brute_force_grad_samples(
        model, x, loss_fn=lambda out, t: nn.functional.cross_entropy(out, t), targets=y
    )
    gsm(torch.randn(6, 4))  # output dropped at once
    criterion(gsm(x), y).backward()
    _assert_clipped_sum(model, expected)


@pytest.mark.parametrize("path", ["anchors", "parameter_gradients"])
def test_input_requiring_grad_matches_oracle(path, monkeypatch):
    """The output hooks fire whether the norm pass asks for the anchors' gradients or for the
    parameters' (a module-level backward hook on the first layer would wait for the input's
    gradient, which the parameter path never computes, and its norm would be missing)."""
    model, gsm, opt, criterion = _setup()
    if path == "parameter_gradients":
        # As on a torch whose captured gradients skip tensor hooks: parameter gradients.
        monkeypatch.setattr(fgc_module, "tensor_hooks_run_on_captured_gradients", lambda: False)
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    expected = brute_force_grad_samples(
        model, x.detach(), loss_fn=lambda out, t: nn.functional.cross_entropy(out, t), targets=y
    )
    loss = criterion(gsm(x), y)
    loss.backward()
    _assert_clipped_sum(model, expected)


class _CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        live = self.fc(x)
        self.fc(2 * x + 1)  # a second call whose output the loss never uses
        return live


@pytest.mark.parametrize("path", ["anchors", "parameter_gradients"])
def test_a_call_the_loss_never_uses_contributes_nothing(path, monkeypatch):
    torch.manual_seed(0)
    model = _CalledTwice()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    expected = brute_force_grad_samples(
        model, x, loss_fn=lambda out, t: nn.functional.cross_entropy(out, t), targets=y
    )
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=0.05, loss_reduction="sum")
    if path == "parameter_gradients":
        # As on a torch whose captured gradients skip tensor hooks: parameter gradients.
        monkeypatch.setattr(fgc_module, "tensor_hooks_run_on_captured_gradients", lambda: False)
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=0.05,
        expected_batch_size=6,
        loss_reduction="sum",
    )
    criterion = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), loss_reduction="sum")
    criterion(gsm(x), y).backward()
    _assert_clipped_sum(model, expected)


def test_this_torch_runs_tensor_hooks_on_captured_gradients():
    """The anchored norm pass is taken on the torch CI pins (else parameter gradients are)."""
    assert fgc_module.tensor_hooks_run_on_captured_gradients()

"""Ghost clipping refuses to clip when a layer's norm is missing from the norm pass (it would count
as zero and under-clip), and still matches the oracle when nothing is missing."""

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModuleFastGradientClipping
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


def test_fallback_with_input_requiring_grad_raises_instead_of_under_clipping():
    _, gsm, opt, criterion = _setup()
    gsm.first_pass_anchors = lambda: None  # force the parameter-gradient fallback path
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    loss = criterion(gsm(x), y)
    with pytest.raises(RuntimeError, match=r"no per-sample norm for '0' \(Linear\)"):
        loss.backward()


def test_forward_without_backward_is_refused():
    _, gsm, opt, criterion = _setup()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    gsm(torch.randn(6, 4))  # a stray forward whose activations are never consumed
    loss = criterion(gsm(x), y)
    with pytest.raises(RuntimeError, match="no per-sample norm"):
        loss.backward()


def test_input_requiring_grad_on_the_default_path_matches_oracle():
    model, gsm, opt, criterion = _setup()
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    expected = brute_force_grad_samples(
        model, x.detach(), loss_fn=lambda out, t: nn.functional.cross_entropy(out, t), targets=y
    )
    loss = criterion(gsm(x), y)
    loss.backward()
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()], dim=1).norm(dim=1)
    factors = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        clipped = torch.einsum("i,i...->...", factors, expected[name])
        torch.testing.assert_close(p.grad, clipped, atol=1e-6, rtol=1e-5)

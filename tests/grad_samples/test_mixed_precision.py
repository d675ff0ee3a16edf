"""Per-sample gradients and norms under bf16 autocast on CPU, and with half-precision values.

Oracle: the brute-force float32 per-sample gradients of the same model without autocast
(``tests.oracle``), and closed-form norms for the overflow cases.  Tolerances are bf16's: an
8-bit mantissa gives ~0.4% relative error per rounding, so per-parameter errors are compared
relative to the gradient's norm.
"""

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.optimizers.clipping import per_sample_norms, per_sample_param_norms
from tests.oracle import brute_force_grad_samples

BF16_RTOL = 5e-2


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, tokens):
        return self.fc2(self.norm(torch.relu(self.fc1(self.emb(tokens))))).mean(dim=1)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _loss(out):
    return out.float().pow(2).sum()


@pytest.mark.parametrize(
    "make_model,make_input",
    [
        (TokenNet, lambda: torch.randint(0, 20, (6, 5))),
        (ConvNet, lambda: torch.randn(6, 2, 5, 5)),
    ],
    ids=["embedding-linear-layernorm", "conv-linear"],
)
def test_hooks_grad_samples_under_bf16_autocast_match_float32_oracle(make_model, make_input):
    torch.manual_seed(0)
    model, x = make_model(), make_input()
    expected = brute_force_grad_samples(model, x, loss_fn=_loss)
    gsm = GradSampleModule(model, loss_reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gsm(x)
    assert out.dtype == torch.bfloat16  # autocast is really on
    _loss(out).backward()
    for name, p in model.named_parameters():
        gs = p.grad_sample
        assert gs.dtype == torch.float32, f"{name}: grad_sample dtype {gs.dtype}"
        assert torch.isfinite(gs).all(), name
        err = _relative_error(gs, expected[name])
        assert err < BF16_RTOL, f"{name}: relative error {err:.3g} vs the float32 oracle"
        norms = per_sample_param_norms(gs)
        assert norms.dtype == torch.float32 and torch.isfinite(norms).all()


def test_ghost_norms_under_bf16_autocast_are_float32_and_close_to_oracle():
    torch.manual_seed(1)
    model, x = TokenNet(), torch.randint(0, 20, (6, 5))
    expected = brute_force_grad_samples(model, x, loss_fn=_loss)
    expected_norms = per_sample_norms([g for g in expected.values()])
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gsm(x)
    _loss(out).backward()
    norms = gsm.get_norm_sample()
    assert norms.dtype == torch.float32
    assert torch.isfinite(norms).all()
    torch.testing.assert_close(norms, expected_norms.float(), rtol=BF16_RTOL, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_sample_norms_of_half_gradients_do_not_overflow(dtype):
    # sqrt(10000) * 1000 = 1e5 > float16's max 65504: must come back finite, in float32.
    gs = torch.full((3, 100, 100), 1000.0, dtype=dtype)
    norms = per_sample_param_norms(gs)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.full((3,), 1e5), rtol=1e-2, atol=0)
    total = per_sample_norms([gs, torch.zeros(3, 4, dtype=dtype)])
    torch.testing.assert_close(total, torch.full((3,), 1e5), rtol=1e-2, atol=0)


@pytest.mark.parametrize("seq_len", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_ghost_norm_of_half_inputs_matches_float64(seq_len, dtype):
    # Entries of 30: every Gram entry / squared norm exceeds float16's range.
    torch.manual_seed(2)
    layer = nn.Linear(16, 8).to(dtype)
    a = (30 * torch.randn(4, seq_len, 16)).to(dtype)
    b = (30 * torch.randn(4, seq_len, 8)).to(dtype)
    norms = compute_linear_norm_sample(layer, [a], b)
    exact_w = torch.einsum("nto,nti->noi", b.double(), a.double()).flatten(1).norm(dim=1)
    exact_b = b.double().sum(dim=1).norm(dim=1)
    assert norms[layer.weight].dtype == torch.float32
    assert torch.isfinite(norms[layer.weight]).all()
    torch.testing.assert_close(norms[layer.weight].double(), exact_w, rtol=1e-3, atol=0)
    torch.testing.assert_close(norms[layer.bias].double(), exact_b, rtol=1e-3, atol=0)

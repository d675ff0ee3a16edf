"""Safety checks of the hooks: layers that mix samples, and models changed after wrapping."""

import timeit

import pytest
import torch
import torch.nn as nn

import opacus.grad_sample.grad_sample_module as gsm_module
from opacus.grad_sample import (
    GradSampleHooks,
    GradSampleModule,
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.safety_checks import ModelStructure
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples, grad_samples_of


class Centered(nn.Module):
    """A trainable layer that mixes samples: ``x * w`` minus its batch mean (like BatchNorm)."""

    def __init__(self, d=3, dim=0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.dim = dim

    def forward(self, x):
        y = x * self.w
        return y - y.mean(self.dim, keepdim=True)


class Scaled(nn.Module):
    """A per-sample custom layer without a grad sampler (functorch fallback)."""

    def __init__(self, d=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x * self.w) + x.pow(2).sum(-1, keepdim=True) * self.w


class NoisyScaled(Scaled):
    def forward(self, x):
        return nn.functional.dropout(super().forward(x), 0.5, self.training)


def _step(model, x, reduction="mean"):
    out = model(x)
    batch = x.shape[0] if getattr(model, "batch_first", True) else x.shape[1]
    (out.sum() / batch if reduction == "mean" else out.sum()).backward()


def _mixing_model():
    return nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Tanh(), Centered()))


@pytest.mark.parametrize("force_functorch", [False, True])
def test_mixing_layer_raises_naming_path_and_class(force_functorch):
    gsm = GradSampleModule(_mixing_model(), force_functorch=force_functorch)
    with pytest.raises(RuntimeError, match=r"'1\.1' \(Centered\).*mixes samples"):
        gsm(torch.randn(5, 3))


def test_mixing_layer_raises_time_major():
    model = nn.Sequential(nn.Linear(3, 3), Centered(dim=1))
    gsm = GradSampleModule(model, batch_first=False)
    with pytest.raises(RuntimeError, match=r"'1' \(Centered\).*dim 1"):
        gsm(torch.randn(4, 5, 3))


def test_mixing_layer_raises_with_ghost_clipping():
    gsm = GradSampleModuleFastGradientClipping(_mixing_model())
    with pytest.raises(RuntimeError, match="mixes samples"):
        gsm(torch.randn(5, 3))


def test_mixing_layer_raises_with_hooks_only():
    model = _mixing_model()
    GradSampleHooks(model)
    with pytest.raises(RuntimeError, match=r"'1\.1' \(Centered\)"):
        model(torch.randn(5, 3))


def test_probe_waits_for_a_batch_of_two():
    gsm = GradSampleModule(_mixing_model())
    for batch in (1, 0):
        gsm(torch.randn(batch, 3))  # nothing to compare: no error, no probe yet
        gsm.zero_grad()
    with pytest.raises(RuntimeError, match="mixes samples"):
        gsm(torch.randn(2, 3))


def test_probe_skipped_in_eval_and_no_grad():
    gsm = GradSampleModule(_mixing_model())
    with torch.no_grad():
        gsm(torch.randn(4, 3))
    gsm.eval()
    gsm(torch.randn(4, 3))
    gsm.train()
    with pytest.raises(RuntimeError, match="mixes samples"):
        gsm(torch.randn(4, 3))


def test_probe_can_be_switched_off():
    gsm = GradSampleModule(_mixing_model())
    with pytest.raises(RuntimeError, match="mixes samples"):
        gsm(torch.randn(4, 3))
    assert not gsm._capture.counts()  # the failed forward left nothing behind
    gsm.check_batch_mixing = False
    _step(gsm, torch.randn(4, 3))
    assert gsm._module[0].weight.grad_sample.shape == (4, 3, 3)
    model = _mixing_model()
    model[1][1]._opacus_skip_batch_mixing_check = True
    GradSampleModule(model)(torch.randn(4, 3))


def test_probe_skips_random_forward():
    # vmap cannot replay dropout; the probe must not misfire (the fallback refuses it itself).
    gsm = GradSampleModule(nn.Sequential(nn.Linear(3, 3), NoisyScaled()))
    gsm(torch.randn(6, 3))


@pytest.mark.parametrize(
    "make_model, shape",
    [
        (lambda: nn.Sequential(nn.Linear(3, 3), nn.PReLU(3), Scaled()), (5, 3)),
        (lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, 2, stride=2), nn.Tanh()), (4, 2, 3, 3)),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_fallback_layers_pass_and_match_oracle(make_model, shape, reduction):
    torch.manual_seed(0)
    model = make_model()
    x = torch.randn(*shape)
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction=reduction)
    _step(gsm, x, reduction)
    assert_grad_samples_close(grad_samples_of(gsm), expected)


def test_bilinear_passes_and_matches_oracle():
    torch.manual_seed(0)
    layer = nn.Bilinear(3, 4, 2)
    x1, x2 = torch.randn(5, 3), torch.randn(5, 4)
    expected = brute_force_grad_samples(layer, (x1, x2))
    gsm = GradSampleModule(layer, loss_reduction="sum")
    gsm(x1, x2).sum().backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)


def test_probe_runs_once_per_fallback_layer(monkeypatch):
    calls = []
    real = gsm_module.batch_mixing_mismatch

    def counting(layer, *args):
        calls.append(type(layer).__name__)
        return real(layer, *args)

    monkeypatch.setattr(gsm_module, "batch_mixing_mismatch", counting)
    gsm = GradSampleModule(nn.Sequential(nn.Linear(3, 3), nn.PReLU(3), Scaled(), nn.Linear(3, 2)))
    for _ in range(3):
        _step(gsm, torch.randn(4, 3))
        gsm.zero_grad()
    assert sorted(calls) == ["PReLU", "Scaled"]  # registered Linear samplers are not probed


# ---------------------------------------------------------------- structure changes
def _mlp():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_batch_norm_added_after_wrapping_raises():
    gsm = GradSampleModule(_mlp())
    _step(gsm, torch.randn(3, 4))
    gsm._module.add_module("bn", nn.BatchNorm1d(2))
    with pytest.raises(RuntimeError, match=r"(?s)added 'bn' \(BatchNorm1d\).*make_private"):
        gsm(torch.randn(3, 4))


def test_replaced_and_removed_layers_are_listed():
    gsm = GradSampleModule(_mlp())
    gsm._module[0] = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match=r"replaced '0' \(Linear -> Linear\)"):
        gsm(torch.randn(3, 4))
    gsm = GradSampleModule(_mlp())
    del gsm._module[1]
    with pytest.raises(RuntimeError, match="removed '2' \\(Linear\\)"):
        gsm(torch.randn(3, 4))


def test_parameter_replaced_raises_and_freezing_is_allowed():
    gsm = GradSampleModule(_mlp())
    gsm._module[2].bias.requires_grad_(False)
    _step(gsm, torch.randn(3, 4))  # freezing only removes gradients
    assert gsm._module[0].weight.grad_sample.shape == (3, 4, 4)
    gsm._module[2].weight = nn.Parameter(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="parameter '2.weight' was added or replaced"):
        gsm(torch.randn(3, 4))


def test_unfrozen_parameter_is_described():
    model = _mlp()
    model[0].requires_grad_(False)
    structure = ModelStructure(model)
    model[0].weight.requires_grad_(True)
    assert structure.describe_changes() == [
        "parameter '0.weight' is trainable but was frozen at wrap time"
    ]


def test_structure_checked_by_ghost_and_hooks_only():
    gsm = GradSampleModuleFastGradientClipping(_mlp())
    gsm._module.append(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"added '3' \(Linear\)"):
        gsm(torch.randn(3, 4))
    model = _mlp()
    GradSampleHooks(model)
    model.append(nn.BatchNorm1d(2))
    with pytest.raises(RuntimeError, match="BatchNorm1d"):
        model(torch.randn(3, 4))


def test_remove_hooks_stops_structure_check():
    gsm = GradSampleModule(_mlp())
    model = gsm.to_standard_module()
    model.append(nn.Linear(2, 2))
    model(torch.randn(3, 4))


def test_structure_check_is_cheap():
    # Measured against the forward of the same 100-layer model without hooks: the check walks
    # ``_modules`` once; it must stay a small fraction of even a tiny model's forward.
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(100)])
    structure = ModelStructure(model)
    x = torch.randn(2, 8)
    check = min(timeit.repeat(lambda: structure.check("m"), number=50, repeat=5)) / 50
    forward = min(timeit.repeat(lambda: model(x), number=5, repeat=5)) / 5
    assert check < 0.25 * forward, (check, forward)

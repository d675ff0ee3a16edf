"""Per-sample gradient buffers reused across steps must never overwrite a tensor still in use.

Oracle: ``tests.oracle.brute_force_grad_samples`` for every step's values, and a snapshot of a
tensor handed out in an earlier step.
"""

import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.buffers import MIN_POOLED_BYTES
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples


def _model():
    # The weights' per-sample gradients (16 x 128 x 256 floats, 16 x 8 x 4 x 9 x 9...) are large
    # enough to be pooled.
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 9 * 9, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
    )


def _step(gsm, model, x, reference):
    """One backward through ``gsm``; checked against the oracle on an unhooked twin."""
    for p in model.parameters():
        p.grad_sample = None
        p.grad = None
    gsm(x).pow(2).sum().backward()
    reference.load_state_dict(model.state_dict())
    expected = brute_force_grad_samples(reference, x, loss_fn=lambda out: out.pow(2).sum())
    actual = {n: p.grad_sample for n, p in model.named_parameters()}
    assert_grad_samples_close(actual, expected, atol=1e-4, rtol=1e-4)
    return actual


def test_buffers_are_reused_when_released_and_values_stay_right():
    torch.manual_seed(0)
    model = _model()
    weight = model[4].weight
    assert 16 * weight.numel() * 4 >= MIN_POOLED_BYTES
    gsm = GradSampleModule(model, loss_reduction="sum")
    first = _step(gsm, model, torch.randn(16, 4, 9, 9), _model())
    ptr = first["4.weight"].data_ptr()
    del first
    second = _step(gsm, model, torch.randn(16, 4, 9, 9), _model())
    assert second["4.weight"].data_ptr() == ptr  # the step wrote into last step's buffer


def test_a_held_grad_sample_is_never_overwritten():
    torch.manual_seed(1)
    model = _model()
    gsm = GradSampleModule(model, loss_reduction="sum")
    held = _step(gsm, model, torch.randn(16, 4, 9, 9), _model())
    snapshot = {n: g.clone() for n, g in held.items()}
    view = held["2.weight"][3]  # a view keeps the storage alive too
    view_snapshot = view.clone()
    del held["2.weight"]
    _step(gsm, model, torch.randn(16, 4, 9, 9), _model())
    for name, g in held.items():
        assert torch.equal(g, snapshot[name]), name
    assert torch.equal(view, view_snapshot)


def test_layer_used_twice_in_one_forward_accumulates_correctly():
    torch.manual_seed(2)

    def tied():
        fc = nn.Linear(256, 256)
        return nn.Sequential(fc, nn.Tanh(), fc)

    model = tied()
    gsm = GradSampleModule(model, loss_reduction="sum")
    for _ in range(2):
        _step(gsm, model, torch.randn(8, 256), tied())

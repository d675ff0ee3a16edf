"""Dirac canaries and the canary parameter wrapper (opacus.auditing.canary)."""

import pytest
import torch
from torch import nn

from opacus.auditing import CanaryModule, dirac_canary_gradients, insert_canary_gradients
from opacus.grad_sample import GradSampleModule
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples, grad_samples_of


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))


def test_canary_module_keeps_outputs_and_grad_samples():
    model = _model()
    wrapped = CanaryModule(model, 7)
    x = torch.randn(6, 5)
    torch.testing.assert_close(wrapped(x), model(x))
    expected = brute_force_grad_samples(wrapped, x)  # before the hooks are attached
    gsm = GradSampleModule(wrapped, loss_reduction="sum")
    gsm(x).sum().backward()
    got = grad_samples_of(gsm)
    assert_grad_samples_close(got, expected)
    assert torch.count_nonzero(got["canary.weight"]) == 0
    assert got["canary.weight"].shape == (6, 1, 7)


def test_canary_module_batch_second_and_errors():
    wrapped = CanaryModule(nn.Linear(4, 4), 3, batch_dim=1)
    assert wrapped(torch.randn(2, 5, 4)).shape == (2, 5, 4)
    with pytest.raises(ValueError, match="num_canaries"):
        CanaryModule(nn.Linear(2, 2), 0)

    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="must return a tensor"):
        CanaryModule(TupleOut(), 2)(torch.randn(3, 2))


def test_dirac_canary_gradients():
    rows = dirac_canary_gradients(torch.tensor([True, False, True, True]), 2.5)
    assert rows.shape == (3, 1, 4)
    norms = torch.linalg.vector_norm(rows.flatten(1), dim=1)
    torch.testing.assert_close(norms, torch.full((3,), 2.5))
    torch.testing.assert_close(rows.sum(0)[0], torch.tensor([2.5, 0.0, 2.5, 2.5]))
    assert dirac_canary_gradients(torch.zeros(4, dtype=torch.bool), 1.0).shape == (0, 1, 4)


def _params_with_grad_samples(batch=5):
    a, b, canary = (
        nn.Parameter(torch.zeros(3)),
        nn.Parameter(torch.zeros(2, 2)),
        nn.Parameter(torch.zeros(1, 4)),
    )
    # row i of every parameter carries the sample id i + 1, so the pairing can be checked
    ids = torch.arange(1, batch + 1, dtype=torch.float32)
    a.grad_sample = ids[:, None].expand(batch, 3).clone()
    b.grad_sample = ids[:, None, None].expand(batch, 2, 2).clone()
    canary.grad_sample = torch.zeros(batch, 1, 4)
    return a, b, canary


def test_insert_canary_gradients_keeps_rows_aligned():
    a, b, canary = _params_with_grad_samples()
    rows = dirac_canary_gradients(torch.tensor([True, True, False, True]), 3.0)
    gen = torch.Generator().manual_seed(0)
    insert_canary_gradients([a, b, canary], canary, rows, generator=gen)
    assert a.grad_sample.shape == (8, 3) and b.grad_sample.shape == (8, 2, 2)
    assert canary.grad_sample.shape == (8, 1, 4)
    # the sum over samples is unchanged for a, b and gains the canaries for the canary param
    assert a.grad_sample.sum() == 3 * 15
    torch.testing.assert_close(canary.grad_sample.sum(0)[0], torch.tensor([3.0, 3.0, 0.0, 3.0]))
    # every row is either a real sample (same id everywhere, no canary) or a pure canary
    is_canary = canary.grad_sample.flatten(1).abs().sum(1) > 0
    assert is_canary.sum() == 3
    torch.testing.assert_close(a.grad_sample[:, 0], b.grad_sample[:, 0, 0])
    assert torch.all(a.grad_sample[is_canary] == 0) and torch.all(a.grad_sample[~is_canary] > 0)
    assert not torch.equal(is_canary, torch.tensor([False] * 5 + [True] * 3))  # scattered


def test_insert_canary_gradients_list_chunks_and_errors():
    a, b, canary = _params_with_grad_samples()
    for p in (a, b, canary):
        p.grad_sample = [p.grad_sample[:2], p.grad_sample[2:]]
    insert_canary_gradients([a, b, canary], canary, dirac_canary_gradients(torch.ones(4) > 0, 1.0))
    assert [g.shape[0] for g in a.grad_sample] == [2, 7]
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        insert_canary_gradients([a, b], canary, dirac_canary_gradients(torch.ones(4) > 0, 1.0))
    b.grad_sample = None
    with pytest.raises(ValueError, match="ghost"):
        rows = dirac_canary_gradients(torch.ones(4) > 0, 1.0)
        insert_canary_gradients([a, b, canary], canary, rows)

"""Book-keeping (Bu et al. 2023): the hooks' cached per-sample norms / outer-product factors.

The hooks cache, for 2-D-input ``nn.Linear`` layers, each parameter's exact per-sample norms (and
the ``(a, b)`` factors of ``grad_sample[i] = b_i a_i^T``), and the optimizer uses them instead of
reading ``p.grad_sample``.  A stale cache would under-clip (a privacy breach), so every test checks
the noiseless DP update against the brute-force oracle (``tests.oracle`` per-sample gradients,
clipped sample by sample in ``dp_reference``), including the cases that must invalidate it.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer, clipping
from opacus.optimizers.optimizer import GRAD_SAMPLE_NORMS_ATTR, cached_grad_sample_norms
from tests.optimizers.dp_reference import (
    ce_loss,
    clipped_sum_flat,
    clipped_sum_per_layer,
)
from tests.oracle import brute_force_grad_samples

B = 6


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()


def data(model_name: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (B, 5) if model_name == "mlp" else (B, 2, 4, 4)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 3, torch.randint(
        0, 3, (B,), generator=g
    )


def oracle(model: nn.Module, x, y):
    gs = brute_force_grad_samples(model, x, loss_fn=ce_loss, targets=y)
    return [gs[n] for n, p in model.named_parameters() if p.requires_grad]


def make(model_name: str, per_layer: bool, reduction: str, seed: int = 0):
    torch.manual_seed(seed)
    model = mlp() if model_name == "mlp" else cnn()
    reference = mlp() if model_name == "mlp" else cnn()
    reference.load_state_dict(model.state_dict())
    gsm = GradSampleModule(model, loss_reduction=reduction)
    n = len(list(model.parameters()))
    # Bounds around the typical norm: some samples are clipped, some are not.
    c = [0.3] * n if per_layer else 1.0
    cls = DPPerLayerOptimizer if per_layer else DPOptimizer
    opt = cls(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=c,
        expected_batch_size=B,
        loss_reduction=reduction,
    )
    return gsm, reference, opt, c


def expected_update(grad_samples, c, per_layer, reduction, batches=1):
    sums = (
        clipped_sum_per_layer(grad_samples, c) if per_layer else clipped_sum_flat(grad_samples, c)
    )
    if reduction == "mean":
        sums = [s / (B * batches) for s in sums]
    return sums


def run_step(gsm, opt, x, y, reduction):
    before = [p.detach().clone() for p in gsm.parameters()]
    opt.zero_grad()
    F.cross_entropy(gsm(x), y, reduction=reduction).backward()
    return before


def check_update(gsm, before, expected):
    for (name, p), b, e in zip(gsm._module.named_parameters(), before, expected):
        torch.testing.assert_close(b - p.detach(), e, atol=1e-9, rtol=1e-7, msg=name)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_update_matches_oracle(model_name, per_layer, reduction):
    gsm, reference, opt, c = make(model_name, per_layer, reduction)
    x, y = data(model_name)
    for step in range(2):  # the second step reuses pooled buffers
        x, y = data(model_name, seed=step + 1)
        expected = expected_update(oracle(reference, x, y), c, per_layer, reduction)
        before = run_step(gsm, opt, x, y, reduction)
        linear_params = list(gsm._module[-1].parameters())
        for p in linear_params:
            assert cached_grad_sample_norms(p, p.grad_sample) is not None
        if model_name == "cnn":
            for p in gsm._module[0].parameters():
                assert cached_grad_sample_norms(p, p.grad_sample) is None
        opt.step()
        check_update(gsm, before, expected)
        reference.load_state_dict(gsm._module.state_dict())


def test_mlp_cache_is_hit(monkeypatch):
    """The fast path must really run: no per-sample norm or weighted sum reads grad_sample."""
    gsm, reference, opt, c = make("mlp", False, "mean")
    x, y = data("mlp")
    calls = []
    for name in ("per_sample_param_norms", "weighted_sum"):
        original = getattr(clipping, name)

        def counting(*args, _original=original, _name=name):
            # Bias gradients (B, out) are cheap to read; weights (B, out, in) must not be read.
            if args[-1].dim() > 2:
                calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(clipping, name, counting)
    expected = expected_update(oracle(reference, x, y), c, False, "mean")
    before = run_step(gsm, opt, x, y, "mean")
    for p in gsm.parameters():
        norms = torch.linalg.vector_norm(p.grad_sample.flatten(1), dim=1)
        cached = cached_grad_sample_norms(p, p.grad_sample)
        assert cached is not None and cached[0].dtype == p.grad_sample.dtype
        torch.testing.assert_close(cached[0], norms, rtol=1e-12, atol=0)
    opt.step()
    assert calls == []
    check_update(gsm, before, expected)
    opt.zero_grad()
    assert not any(hasattr(p, GRAD_SAMPLE_NORMS_ATTR) for p in gsm.parameters())


@pytest.mark.parametrize("per_layer", [False, True])
def test_two_backward_passes_accumulate(per_layer):
    """Two backward passes keep their samples apart (a list of two chunks): every sample of
    both batches is clipped on its own; a cache may only describe the chunk it was made for."""
    gsm, reference, opt, c = make("mlp", per_layer, "sum")
    x1, y1 = data("mlp", seed=1)
    x2, y2 = data("mlp", seed=2)
    grads = [
        torch.cat([g1, g2]) for g1, g2 in zip(oracle(reference, x1, y1), oracle(reference, x2, y2))
    ]
    expected = expected_update(grads, c, per_layer, "sum")
    before = run_step(gsm, opt, x1, y1, "sum")
    F.cross_entropy(gsm(x2), y2, reduction="sum").backward()
    for p in gsm.parameters():
        assert isinstance(p.grad_sample, list) and len(p.grad_sample) == 2
        assert cached_grad_sample_norms(p, p.grad_sample) is None
    assert opt.accumulated_iterations == 2
    opt.step()
    check_update(gsm, before, expected)


def test_virtual_step_then_real_step():
    """A skipped (virtual) step, then a second batch: each uses its own valid cache."""
    gsm, reference, opt, c = make("mlp", False, "mean")
    x1, y1 = data("mlp", seed=1)
    x2, y2 = data("mlp", seed=2)
    s1 = expected_update(oracle(reference, x1, y1), c, False, "sum")
    s2 = expected_update(oracle(reference, x2, y2), c, False, "sum")
    before = run_step(gsm, opt, x1, y1, "mean")
    opt.signal_skip_step(True)
    opt.step()
    run_step(gsm, opt, x2, y2, "mean")
    opt.step()
    check_update(gsm, before, [(a + b) / B for a, b in zip(s1, s2)])


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("how", ["in_place", "row", "reassign"])
def test_user_edit_of_grad_sample_is_used(per_layer, how):
    gsm, reference, opt, c = make("mlp", per_layer, "mean")
    x, y = data("mlp")
    grads = oracle(reference, x, y)
    before = run_step(gsm, opt, x, y, "mean")
    weight = gsm._module[0].weight
    if how == "in_place":
        weight.grad_sample.mul_(5.0)
        grads[0] = grads[0] * 5.0
    elif how == "row":
        weight.grad_sample[2] += 4.0
        grads[0] = grads[0].clone()
        grads[0][2] += 4.0
    else:
        new = weight.grad_sample.clone()
        new.mul_(5.0)
        # Same version counter value as the cached tensor: only the identity check catches it.
        while new._version < getattr(weight, GRAD_SAMPLE_NORMS_ATTR)[1]:
            new.add_(0.0)
        assert new._version == getattr(weight, GRAD_SAMPLE_NORMS_ATTR)[1]
        weight.grad_sample = new
        grads[0] = grads[0] * 5.0
    assert cached_grad_sample_norms(weight, weight.grad_sample) is None
    opt.step()
    check_update(gsm, before, expected_update(grads, c, per_layer, "mean"))


def test_shared_weight_and_repeated_call_are_not_cached():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.c = nn.Linear(4, 3)

        def forward(self, x):
            return self.c(self.c.weight.new_ones(1) * self.b(torch.tanh(self.a(x)))) + self.c(x)

    torch.manual_seed(0)
    model = Tied().double()
    reference = copy.deepcopy(model)
    gsm = GradSampleModule(model, loss_reduction="sum")
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=B,
        loss_reduction="sum",
    )
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (B,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    gs = brute_force_grad_samples(reference, x, loss_fn=ce_loss, targets=y)
    expected = clipped_sum_flat([gs[n] for n in names], 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    assert cached_grad_sample_norms(model.a.weight, model.a.weight.grad_sample) is None
    assert cached_grad_sample_norms(model.c.weight, model.c.weight.grad_sample) is None
    assert cached_grad_sample_norms(model.a.bias, model.a.bias.grad_sample) is not None
    opt.step()
    for n, p, b, e in zip(names, model.parameters(), before, expected):
        torch.testing.assert_close(b - p.detach(), e, atol=1e-9, rtol=1e-7, msg=n)


def test_sequence_input_is_not_cached_and_correct():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    reference = copy.deepcopy(model)
    gsm = GradSampleModule(model, loss_reduction="sum")
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=B,
        loss_reduction="sum",
    )
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, 3, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (B,), generator=g)
    expected = clipped_sum_flat(oracle(reference, x, y), 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    assert cached_grad_sample_norms(model[0].weight, model[0].weight.grad_sample) is None
    assert cached_grad_sample_norms(model[3].weight, model[3].weight.grad_sample) is not None
    opt.step()
    for p, b, e in zip(model.parameters(), before, expected):
        torch.testing.assert_close(b - p.detach(), e, atol=1e-9, rtol=1e-7)


def test_remove_hooks_clears_cache():
    gsm, _, opt, _ = make("mlp", False, "mean")
    x, y = data("mlp")
    run_step(gsm, opt, x, y, "mean")
    assert all(hasattr(p, GRAD_SAMPLE_NORMS_ATTR) for p in gsm.parameters())
    gsm.remove_hooks()
    assert not any(hasattr(p, GRAD_SAMPLE_NORMS_ATTR) for p in gsm.parameters())


def test_hooks_book_keeping_uses_ghost_clippings_samplers(monkeypatch):
    """One book-keeping implementation: the optimizer's cached norms and clipped sums of a
    Linear come from the same NORM_SAMPLERS / CLIPPED_SUM_SAMPLERS as ghost clipping's."""
    from opacus.grad_sample import registry

    calls = []
    for table in (registry.NORM_SAMPLERS, registry.CLIPPED_SUM_SAMPLERS):
        original = table[nn.Linear]

        def counting(*args, _original=original, _table=table):
            calls.append(_table is registry.CLIPPED_SUM_SAMPLERS)
            return _original(*args)

        monkeypatch.setitem(table, nn.Linear, counting)
    gsm, reference, opt, c = make("mlp", False, "mean")
    x, y = data("mlp")
    expected = expected_update(oracle(reference, x, y), c, False, "mean")
    before = run_step(gsm, opt, x, y, "mean")
    assert calls and not any(calls)  # the backward pass computed the norms only
    opt.step()
    assert any(calls)  # the step formed the weights' clipped sums with the ghost sampler
    check_update(gsm, before, expected)


@pytest.mark.parametrize("per_layer", [False, True])
def test_input_written_in_place_before_step_falls_back_to_the_stored_gradients(per_layer):
    """The book-kept clipped sum of a Linear is formed at ``step()`` from the layer's input,
    while its norms were taken at backward time: a batch buffer refilled (written in place)
    between ``backward()`` and ``step()`` must not enter the sum (its samples would not be
    clipped). The optimizer sees the version change and sums ``p.grad_sample`` instead."""
    torch.manual_seed(0)
    model, reference = mlp(), mlp()
    reference.load_state_dict(model.state_dict())
    gsm = GradSampleModule(model, loss_reduction="sum")
    c = [0.5, 0.5, 0.5, 0.5] if per_layer else 0.5
    cls = DPPerLayerOptimizer if per_layer else DPOptimizer
    opt = cls(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=c,
        expected_batch_size=B,
        loss_reduction="sum",
    )
    x, y = data("mlp")
    original = x.clone()
    ce_loss(gsm(x), y).backward()
    assert getattr(model[0].weight, GRAD_SAMPLE_NORMS_ATTR, None) is not None  # book-kept
    x.mul_(50.0)  # the loader refills its buffer before the step
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    gs = oracle(reference, original, y)
    sums = clipped_sum_per_layer(gs, c) if per_layer else clipped_sum_flat(gs, c)
    for p, p0, s in zip(model.parameters(), before, sums):
        torch.testing.assert_close(p0 - p.detach(), s)

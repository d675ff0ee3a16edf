"""Ghost clipping's hooks and passes: per-parameter attributes (behaviour contract cluster 13,
fast-clipping part), activation checkpointing in both reentrant modes (issue 16 item 9) and
``make_private(..., wrap_model=False)`` (issue 16 item 8), against brute-force oracles."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from opacus.grad_sample import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, double_backward
from tests.grad_samples.ghost_stubs import BoundOnly
from tests.optimizers.dp_reference import batch, reference_dp_step, small_model
from tests.oracle import brute_force_grad_samples


def _param_norms(per_sample: dict) -> dict:
    return {n: g.flatten(1).norm(dim=1) for n, g in per_sample.items()}


def _clipped_sum(per_sample: dict, clip: float) -> dict:
    flat = torch.cat([g.flatten(1) for g in per_sample.values()], dim=1)
    coef = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", coef, g) for n, g in per_sample.items()}


def _mlp():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model[2].bias.requires_grad_(False)  # a frozen parameter
    return model.double()


# ------------------------------------------------------------------ cluster 13 attributes
@pytest.mark.parametrize("wrapped", [True, False])
@pytest.mark.parametrize("use_ghost_clipping", [True, False])
def test_norm_sample_set_and_grad_sample_back_to_none(wrapped, use_ghost_clipping):
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(5, 4, dtype=torch.float64)
    expected = _param_norms(brute_force_grad_samples(model, x))
    cls = GradSampleModuleFastGradientClipping if wrapped else GradSampleHooksFastGradientClipping
    hooks = cls(model, loss_reduction="sum", use_ghost_clipping=use_ghost_clipping)
    frozen = model[2].bias
    assert not hasattr(frozen, "grad_sample")
    for p in model.parameters():
        if p.requires_grad:
            assert hasattr(p, "grad_sample") and p.grad_sample is None
    (model(x) if not wrapped else hooks(x)).sum().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert not hasattr(p, "grad_sample") and not hasattr(p, "_norm_sample")
            continue
        assert p.grad_sample is None  # the attribute exists and holds None
        assert p._norm_sample.dim() == 1
        torch.testing.assert_close(p._norm_sample, expected[name], rtol=1e-8, atol=1e-10)


def test_materialised_path_of_a_layer_without_norm_sampler():
    class Scale(nn.Module):  # no grad sampler: torch.func, then its per-sample norms
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor([0.5, -2.0, 1.5]))

        def forward(self, x):
            return x * self.s

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), Scale()).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    expected = _param_norms(brute_force_grad_samples(model, x))
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum")
    gsm(x).sum().backward()
    s = model[1].s
    assert s.grad_sample is None and s._norm_sample.shape == (6,)
    torch.testing.assert_close(s._norm_sample, expected["1.s"])


def test_empty_batch_gives_empty_norms():
    model = _mlp()
    gsm = GradSampleModuleFastGradientClipping(model, use_ghost_clipping=False)
    gsm(torch.randn(0, 4, dtype=torch.float64)).sum().backward()
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad_sample is None and p._norm_sample.shape == (0,)


def test_a_layer_used_twice_is_clipped_correctly_not_refused():
    """Deliberate deviation from Opacus 1.6 (which raises NotImplementedError under ghost
    clipping): the norms of a reused layer are computed from its materialised per-sample
    gradient, so the clipped sum is exact."""
    torch.manual_seed(2)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))

    model = Twice().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    per_sample = brute_force_grad_samples(model, x)
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum")
    loss = gsm(x).sum(dim=1)
    double_backward(gsm, BoundOnly(0.1), loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, _clipped_sum(per_sample, 0.1)[n])


# ------------------------------------------------------------------ activation checkpointing
class _Checkpointed(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.emb = nn.Embedding(12, 6)
        self.block = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)

    def _inner(self, h):
        return self.norm(h + self.block(h))

    def forward(self, x):
        h = self.emb(x)
        if self.mode == "none":
            h = self._inner(h)
        else:
            h = checkpoint(self._inner, h, use_reentrant=self.mode == "reentrant")
        return self.head(h).mean(dim=1)


@pytest.mark.parametrize("mode", ["none", "reentrant", "non_reentrant"])
@pytest.mark.parametrize("book_keeping_ratio", [0.0, float("inf")])
def test_checkpointed_model_clips_like_the_oracle(mode, book_keeping_ratio):
    torch.manual_seed(3)
    model = _Checkpointed(mode).double()
    x = torch.randint(0, 12, (5, 4))
    y = torch.randint(0, 5, (5,))
    ce = nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    reference.mode = "none"
    expected = _clipped_sum(brute_force_grad_samples(reference, x, loss_fn=ce, targets=y), 0.05)
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0)
    gsm.max_book_keeping_ratio = book_keeping_ratio
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=0.05,
        expected_batch_size=5,
    )
    for p in model.parameters():  # earlier clipped sums are kept (added to), as by autograd
        p.grad = torch.ones_like(p)
    out = gsm(x)
    # Reentrant checkpointing ran the block with gradients off: a real backward pass is needed.
    assert gsm.norm_pass_needs_backward() == (mode == "reentrant")
    DPLossFastGradientClipping(gsm, optimizer, ce)(out, y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad - 1, expected[n], rtol=1e-6, atol=1e-10, msg=n)


def test_checkpointed_training_steps_match_the_uncheckpointed_ones():
    x = torch.randint(0, 12, (4, 3))
    y = torch.randint(0, 5, (4,))
    results = {}
    for mode in ("none", "reentrant", "non_reentrant"):
        torch.manual_seed(4)
        model = _Checkpointed(mode).double()
        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0)
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(gsm.parameters(), lr=0.5),
            noise_multiplier=0.0,
            max_grad_norm=0.1,
            expected_batch_size=4,
        )
        criterion = DPLossFastGradientClipping(gsm, optimizer, nn.CrossEntropyLoss())
        for _ in range(2):
            optimizer.zero_grad()
            criterion(gsm(x), y).backward()
            optimizer.step()
        results[mode] = [p.detach().clone() for p in model.parameters()]
    for mode in ("reentrant", "non_reentrant"):
        for a, b in zip(results[mode], results["none"]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------ wrap_model=False
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_make_private_ghost_without_wrapping_trains_like_the_oracle(loss_reduction):
    from opacus import PrivacyEngine

    model, reference = small_model(), small_model()
    x, y = batch(12)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    engine = PrivacyEngine(accountant="rdp")
    hooks, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        criterion=nn.CrossEntropyLoss(reduction=loss_reduction),
        noise_multiplier=0.0,
        max_grad_norm=0.2,
        loss_reduction=loss_reduction,
        grad_sample_mode="ghost",
        wrap_model=False,
        poisson_sampling=False,
    )
    assert isinstance(hooks, GradSampleHooksFastGradientClipping) and hooks._module is model
    for xb, yb in loader:
        optimizer.zero_grad()
        criterion(model(xb), yb).backward()
        optimizer.step()
        reference_dp_step(reference, xb, yb, 6, loss_reduction)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)
    assert len(engine.accountant.history) > 0


def test_a_trainable_parameter_without_hooks_is_refused_not_counted_as_norm_zero():
    """strict=False leaves an unsupported layer without hooks: its samples' gradients have no
    norm, and counting it as 0 would under-clip, so the norm pass refuses, naming it."""

    class WithBuffer(nn.Module):  # trainable, has a buffer, no grad sampler: unsupported
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))
            self.register_buffer("shift", torch.zeros(4))

        def forward(self, x):
            return x * self.w + self.shift

    model = nn.Sequential(nn.Linear(3, 4), WithBuffer(), nn.Linear(4, 2))
    with pytest.warns(UserWarning):
        gsm = GradSampleModuleFastGradientClipping(model, strict=False, loss_reduction="sum")
    assert gsm.unhooked_parameters() == [model[1].w]
    loss = gsm(torch.randn(5, 3)).sum(dim=1)
    with pytest.raises(RuntimeError, match="no per-sample norm.*'1.w'"):
        double_backward(gsm, BoundOnly(0.1), loss)
    # Frozen, the layer needs no norm: the rest is clipped as usual.
    frozen = nn.Sequential(nn.Linear(3, 4), WithBuffer(), nn.Linear(4, 2))
    frozen[1].w.requires_grad_(False)
    gsm2 = GradSampleModuleFastGradientClipping(frozen, loss_reduction="sum")
    assert gsm2.unhooked_parameters() == []
    double_backward(gsm2, BoundOnly(0.1), gsm2(torch.randn(5, 3)).sum(dim=1))
    assert frozen[0].weight.grad is not None

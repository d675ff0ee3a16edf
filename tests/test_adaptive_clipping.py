"""Adaptive clipping on ghost clipping (Andrew et al. 2021), checked against hand computations:
the brute-force per-sample gradients of ``tests.oracle``, the closed-form geometric update, and
the privacy split of Theorem 1 of the paper."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers.adaclipoptimizer import gradient_noise_multiplier
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.utils.adaptive_clipping import (
    DPLossFastGradientAdaptiveClipping,
    DPTensorFastGradientAdaptiveClipping,
    PrivacyEngineAdaptiveClipping,
)
from opacus.utils.adaptive_clipping.adaptive_clipping_utils import (
    COUNT_PRIVACY_SHARE,
    DPOptimizerFastGradientAdaptiveClipping,
    noisy_unclipped_fraction,
    unclipped_num_std_for,
    updated_clip_bound,
)
from tests.oracle import brute_force_grad_samples

B = 8


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _data(seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, 4, generator=g), torch.randint(0, 3, (B,), generator=g)


def _oracle_grads(model, x, y):
    per_sample = brute_force_grad_samples(
        copy.deepcopy(model), x, loss_fn=lambda out, t: F.cross_entropy(out, t), targets=y
    )
    flat = torch.cat([g.reshape(B, -1) for g in per_sample.values()], dim=1)
    return per_sample, flat.norm(dim=1)


def _setup(
    model,
    *,
    clip,
    noise=0.0,
    initial_noise=0.0,
    reduction="mean",
    generator=None,
    expected_batch_size=B,
    **kw
):
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=clip, loss_reduction=reduction)
    optimizer = DPOptimizerFastGradientAdaptiveClipping(
        torch.optim.SGD(gsm.parameters(), lr=0.1),
        noise_multiplier=noise,
        max_grad_norm=clip,
        expected_batch_size=expected_batch_size,
        loss_reduction=reduction,
        generator=generator,
    )
    criterion = DPLossFastGradientAdaptiveClipping(
        gsm,
        optimizer,
        nn.CrossEntropyLoss(),
        reduction,
        initial_noise_multiplier=initial_noise,
        **kw,
    )
    return gsm, optimizer, criterion


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("quantile,lr,n", [(0.5, 0.2, B), (0.9, 1.0, 13), (0.1, 3.0, 5)])
def test_bound_and_clipped_sum_match_hand_computation(reduction, quantile, lr, n):
    # n: the expected batch size (the actual one is B): the released fraction is the centred
    # sum over the B samples divided by n, plus 1/2 (Andrew et al. 2021; module docstring).
    model = _model()
    x, y = _data()
    per_sample, norms = _oracle_grads(model, x, y)
    clip = float(norms.sort().values[2])  # 3 of 8 samples unclipped
    expected_frac = float(((norms <= clip).double() - 0.5).sum()) / n + 0.5
    expected_bound = min(1e8, max(1e-3, clip * math.exp(-lr * (expected_frac - quantile))))

    gsm, optimizer, criterion = _setup(
        model,
        clip=clip,
        reduction=reduction,
        target_unclipped_quantile=quantile,
        clipbound_learning_rate=lr,
        min_clipbound=1e-3,
        expected_batch_size=n,
    )
    loss = criterion(gsm(x), y)
    assert isinstance(loss, DPTensorFastGradientAdaptiveClipping)
    loss.backward()

    assert optimizer.max_grad_norm == pytest.approx(expected_bound, rel=1e-6)
    assert gsm.max_grad_norm == pytest.approx(expected_bound, rel=1e-6)
    assert expected_bound != pytest.approx(clip)  # the test would not notice a missing update
    # The current step clips at the new bound (module docstring), brute force:
    factors = (expected_bound / (norms + 1e-6)).clamp(max=1.0)
    for name, p in gsm._module.named_parameters():
        expected = torch.einsum("i,i...->...", factors, per_sample[name])
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4)


def test_step_noises_at_new_bound_and_updates_params():
    model = _model()
    x, y = _data()
    gsm, optimizer, criterion = _setup(model, clip=1.0)
    before = [p.detach().clone() for p in gsm.parameters()]
    criterion(gsm(x), y).backward()
    clipped_sum = [p.grad.clone() for p in gsm.parameters()]
    optimizer.step()
    for p0, p, s in zip(before, gsm.parameters(), clipped_sum):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * s / B)


@settings(max_examples=40, deadline=None)
@given(
    clip=st.floats(1e-3, 1e3),
    frac=st.floats(-0.5, 1.5),
    quantile=st.floats(0, 1),
    lr=st.floats(0, 10),
    lo=st.floats(1e-3, 1.0),
    span=st.floats(1.0, 100.0),
)
def test_updated_clip_bound_is_the_clamped_geometric_update(clip, frac, quantile, lr, lo, span):
    hi = lo * span
    got = updated_clip_bound(
        clip,
        frac,
        target_unclipped_quantile=quantile,
        clipbound_learning_rate=lr,
        min_clipbound=lo,
        max_clipbound=hi,
    )
    free = clip * math.exp(-lr * (frac - quantile))
    assert lo <= got <= hi
    assert got == pytest.approx(min(hi, max(lo, free)))


@pytest.mark.parametrize("all_clipped", [True, False])
def test_bound_is_clamped_to_min_max(all_clipped):
    # Every sample clipped -> frac 0 -> the bound grows to max_clipbound; no sample clipped ->
    # frac 1 -> it shrinks to min_clipbound (and stays there: the norms are 5x beyond it).
    model = _model()
    x, y = _data()
    _, norms = _oracle_grads(model, x, y)
    clip = float(norms.min()) / 10 if all_clipped else float(norms.max()) * 10
    lo, hi = clip / 2, clip * 2
    gsm, optimizer, criterion = _setup(
        model, clip=clip, min_clipbound=lo, max_clipbound=hi, clipbound_learning_rate=10.0
    )
    for _ in range(3):
        criterion(gsm(x), y).backward()
        optimizer.zero_grad()
        assert lo <= optimizer.max_grad_norm <= hi
        assert optimizer.max_grad_norm == pytest.approx(hi if all_clipped else lo)


def _count_sensitivity(trials=150, seed=0):
    """Largest change, in units of the sum (times n), of the noiseless released fraction when one
    sample is added to or removed from a random batch of norms: the add/remove sensitivity."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(trials):
        size = int(torch.randint(1, 12, (1,), generator=g))
        n = int(torch.randint(1, 20, (1,), generator=g))
        norms = torch.rand(size + 1, generator=g, dtype=torch.float64) * 4
        clip = float(torch.rand(1, generator=g)) * 4
        whole, less = (
            noisy_unclipped_fraction(v, clip, unclipped_num_std=0.0, expected_batch_size=n)
            for v in (norms, norms[:-1])
        )
        worst = max(worst, abs(whole - less) * n)
    return worst


def test_released_statistic_has_sensitivity_one_half():
    assert _count_sensitivity() == pytest.approx(0.5)  # <= 1/2 always, and attained


def test_released_statistic_sensitivity_through_backward():
    # neighbouring batches through the whole backward: the released fraction is read back
    # from the bound update (frac = q - log(C'/C) / lr)
    clip, lr = 1.0, 1e-3
    x, y = _data()
    fracs = []
    for rows in (slice(0, B), slice(0, B - 1)):
        gsm, optimizer, criterion = _setup(
            _model(), clip=clip, clipbound_learning_rate=lr, min_clipbound=1e-6
        )
        criterion(gsm(x[rows]), y[rows]).backward()
        fracs.append(0.5 - math.log(optimizer.max_grad_norm / clip) / lr)
    assert abs(fracs[0] - fracs[1]) * B == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 4.0])
def test_gradient_and_count_releases_compose_to_one_gaussian_of_multiplier_sigma(sigma):
    # zCDP from first principles: a Gaussian of std `std` on a statistic of sensitivity `sens`
    # is rho = sens^2 / (2 std^2)-zCDP, and rho adds up under composition.
    def rho(sens, std):
        return sens**2 / (2 * std**2)

    clip = 0.8
    sigma_b = unclipped_num_std_for(sigma)
    optimizer = DPOptimizerFastGradientAdaptiveClipping(
        torch.optim.SGD(_model().parameters(), lr=0.1),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=B,
        unclipped_num_std=sigma_b,
    )
    grad_rho = rho(clip, optimizer._noise_std())  # the clipped sum: sensitivity C
    count_rho = rho(_count_sensitivity(trials=60), sigma_b)
    assert grad_rho + count_rho == pytest.approx(rho(1.0, sigma))
    # the count takes the documented share of the budget
    assert count_rho == pytest.approx(COUNT_PRIVACY_SHARE * rho(1.0, sigma))


def test_count_noise_has_std_sigma_b():
    norms = torch.tensor([0.5, 1.5, 0.9, 3.0, 1.0, 0.1, 2.0, 1.2])
    gen = torch.Generator().manual_seed(0)
    sigma_b = unclipped_num_std_for(0.2)
    fracs = torch.tensor(
        [
            noisy_unclipped_fraction(
                norms, 1.0, unclipped_num_std=sigma_b, expected_batch_size=B, generator=gen
            )
            for _ in range(4000)
        ]
    )
    exact = 4 / B  # 0.5, 0.9, 1.0, 0.1 are <= 1.0
    assert noisy_unclipped_fraction(norms, 1.0, unclipped_num_std=0.0, expected_batch_size=B) == (
        exact
    )
    # expected batch size 10 != actual 8: centred sum (4 - 8 / 2) / 10 + 1/2
    assert noisy_unclipped_fraction(
        norms, 1.0, unclipped_num_std=0.0, expected_batch_size=10
    ) == pytest.approx(0.5)
    assert noisy_unclipped_fraction(
        norms, 2.5, unclipped_num_std=0.0, expected_batch_size=10
    ) == pytest.approx((7 - 4) / 10 + 0.5)
    assert fracs.mean().item() == pytest.approx(exact, abs=4 * sigma_b / B / math.sqrt(4000))
    assert fracs.std().item() == pytest.approx(sigma_b / B, rel=0.05)


def test_backward_releases_a_noisy_count():
    # Through the whole backward: the released fraction, read back from the bound update
    # (frac = q - log(C'/C) / lr), scatters around the exact fraction.
    sigma, clip, lr = 0.2, 1.0, 1e-3
    model = _model()
    x, y = _data()
    gsm, optimizer, criterion = _setup(
        model,
        clip=clip,
        noise=sigma,
        initial_noise=sigma,
        generator=torch.Generator().manual_seed(0),
        clipbound_learning_rate=lr,
        min_clipbound=1e-6,
    )
    fracs = []
    for _ in range(40):
        optimizer.max_grad_norm = clip
        criterion(gsm(x), y).backward()
        optimizer.zero_grad()
        fracs.append(0.5 - math.log(optimizer.max_grad_norm / clip) / lr)
    _, norms = _oracle_grads(_model(), x, y)
    exact = float((norms <= clip).sum()) / B
    fracs = torch.tensor(fracs)
    sigma_b = unclipped_num_std_for(sigma)
    assert fracs.mean().item() == pytest.approx(exact, abs=4 * sigma_b / B / math.sqrt(40))
    assert 0.6 * sigma_b / B < fracs.std().item() < 1.4 * sigma_b / B


def test_gradient_noise_uses_sigma_grad():
    sigma, clip = 0.2, 1.5
    sigma_b = unclipped_num_std_for(sigma)
    big = nn.Linear(200, 100)
    opt = DPOptimizerFastGradientAdaptiveClipping(
        torch.optim.SGD(big.parameters(), lr=0.1),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=B,
        unclipped_num_std=sigma_b,
        generator=torch.Generator().manual_seed(0),
    )
    for p in big.parameters():
        p.summed_grad = torch.zeros_like(p)
    opt.add_noise()
    std = big.weight.grad.std().item()
    assert std == pytest.approx(gradient_noise_multiplier(sigma, sigma_b) * clip, rel=0.03)
    assert opt.noise_multiplier == sigma  # the accountant still sees the total
    # As every DP setting (Opacus 1.6): not in the checkpoint, kept by load_state_dict.
    state = opt.state_dict()
    assert state == opt.original_optimizer.state_dict()
    opt.load_state_dict(state)
    assert opt.unclipped_num_std == sigma_b


@pytest.mark.parametrize("optimizer_sigma,initial", [(1.0, 0.0), (20.0, 1.0)])
def test_infeasible_split_raises_before_any_release(optimizer_sigma, initial):
    model = _model()
    x, y = _data()
    gsm, optimizer, criterion = _setup(
        model, clip=1.0, noise=optimizer_sigma, initial_noise=initial
    )
    loss = criterion(gsm(x), y)
    with pytest.raises(ValueError, match="unclipped_num_std"):
        loss.backward()
    assert all(p.grad is None for p in gsm.parameters())
    assert optimizer.max_grad_norm == 1.0


def test_plain_fast_gradient_clipping_optimizer_is_refused():
    gsm = GradSampleModuleFastGradientClipping(_model())
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=B,
    )
    with pytest.raises(TypeError, match="PrivacyEngineAdaptiveClipping"):
        DPLossFastGradientAdaptiveClipping(gsm, optimizer, nn.CrossEntropyLoss())


def test_virtual_steps_are_refused():
    model = _model()
    x, y = _data()
    gsm, optimizer, criterion = _setup(model, clip=1.0)
    optimizer.signal_skip_step(True)
    with pytest.raises(NotImplementedError, match="virtual steps"):
        criterion(gsm(x), y).backward()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_unclipped_quantile=1.5), "target_unclipped_quantile"),
        (dict(min_clipbound=2.0, max_clipbound=1.0), "min_clipbound"),
        (dict(min_clipbound=0.0), "min_clipbound"),
        (dict(clipbound_learning_rate=-1.0), "clipbound_learning_rate"),
    ],
)
def test_bad_knobs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _setup(_model(), clip=1.0, **kwargs)


def _loader(n=64, batch_size=16):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_privacy_engine_adaptive_clipping_trains():
    model = _model()
    engine = PrivacyEngineAdaptiveClipping(accountant="rdp")
    module, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=_loader(),
        noise_multiplier=0.5,
        max_grad_norm=10.0,
        target_unclipped_quantile=0.5,
        min_clipbound=0.01,
        max_clipbound=100.0,
        clipbound_learning_rate=0.5,
        noise_generator=torch.Generator().manual_seed(0),
    )
    assert isinstance(criterion, DPLossFastGradientAdaptiveClipping)
    assert isinstance(optimizer, DPOptimizerFastGradientAdaptiveClipping)
    bounds = [optimizer.max_grad_norm]
    start = [p.detach().clone() for p in module.parameters()]
    for _ in range(3):
        for x, y in loader:
            if len(x) == 0:
                continue
            loss = criterion(module(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            bounds.append(optimizer.max_grad_norm)
            assert 0.01 <= optimizer.max_grad_norm <= 100.0
    # Gradient norms of this model are far below 10: the bound must come down toward them.
    assert bounds[-1] < bounds[0] / 2
    assert any(not torch.equal(a, p) for a, p in zip(start, module.parameters()))
    steps = sum(n for _, _, n in engine.accountant.history)
    assert steps == len(bounds) - 1
    assert all(sigma == 0.5 for sigma, _, _ in engine.accountant.history)
    assert 0 < engine.get_epsilon(1e-5) < float("inf")


def test_privacy_engine_adaptive_clipping_refuses_other_modes():
    model = _model()
    engine = PrivacyEngineAdaptiveClipping()
    with pytest.raises(ValueError, match="ghost"):
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=_loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="hooks",
        )


def test_privacy_engine_adaptive_clipping_secure_mode_runs():
    model = _model()
    engine = PrivacyEngineAdaptiveClipping(secure_mode=True)
    module, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=_loader(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    x, y = next(b for b in loader if len(b[0]) > 0)
    criterion(module(x), y).backward()
    optimizer.step()
    assert optimizer.max_grad_norm >= 1.0  # min_clipbound defaults to 1


def test_plain_backward_is_refused_by_the_adaptive_optimizer():
    x, y = _data()
    gsm, optimizer, criterion = _setup(_model(), clip=1e-3, noise=1.0, initial_noise=1.0)
    F.cross_entropy(gsm(x), y).backward()  # not the adaptive criterion: unclipped p.grad
    with pytest.raises(RuntimeError, match="DPLossFastGradientClipping"):
        optimizer.step()
    optimizer.zero_grad()
    criterion(gsm(x), y).backward()
    optimizer.step()  # the adaptive criterion's double backward is accepted


class _ByFreq(nn.Module):
    """A trainable embedding with scale_grad_by_freq and a GroupNorm (no clipped sum, so no
    book-keeping)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, scale_grad_by_freq=True)
        self.norm = nn.GroupNorm(1, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(self.emb(x).transpose(1, 2)).mean(dim=2))


@pytest.mark.parametrize("engine_cls", ["PrivacyEngine", "PrivacyEngineAdaptiveClipping"])
def test_adaptive_ghost_refuses_what_plain_ghost_refuses(engine_cls):
    """Issue 17: adaptive clipping runs ghost clipping's own double backward, with its safety
    checks: scale_grad_by_freq couples the samples and is refused in both engines."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = _ByFreq()
    x = torch.randint(0, 7, (8, 5))
    y = torch.randint(0, 3, (8,))
    engine = {
        "PrivacyEngine": PrivacyEngine,
        "PrivacyEngineAdaptiveClipping": PrivacyEngineAdaptiveClipping,
    }[engine_cls](accountant="rdp")
    module, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
        poisson_sampling=False,
    )
    xb, yb = next(iter(loader))
    loss = criterion(module(xb), yb)
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq"):
        loss.backward()
    # Refused before anything was computed or released: no gradient, no count, no bound move.
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.max_grad_norm == 1.0

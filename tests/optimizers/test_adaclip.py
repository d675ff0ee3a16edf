"""AdaClipDPOptimizer against hand computations of Andrew et al. 2021, Algorithm 1."""

import math

import pytest
import torch
import torch.nn as nn

from opacus.optimizers import AdaClipDPOptimizer, DPOptimizer
from opacus.optimizers.adaclipoptimizer import gradient_noise_multiplier
from tests.optimizers.dp_reference import (
    batch,
    dp_grads,
    oracle_grad_samples,
    set_grad_samples,
    small_model,
)

NORMS = torch.tensor([0.5, 1.0, 1.5, 2.5, 3.0, 4.0, 6.0, 9.0])


def _params_with_norms(norms, dim=3):
    """One parameter whose sample i has gradient norm ``norms[i]``."""
    p = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    direction = torch.zeros(dim, dtype=torch.float64)
    direction[0] = 1.0
    p.grad_sample = norms.double()[:, None] * direction
    return [p]


def _adaclip(ps, **kw):
    args = dict(
        noise_multiplier=0.0,
        target_unclipped_quantile=0.5,
        clipbound_learning_rate=0.2,
        max_clipbound=100.0,
        min_clipbound=0.1,
        unclipped_num_std=0.0,
        max_grad_norm=2.0,
        expected_batch_size=8,
    )
    args.update(kw)
    return AdaClipDPOptimizer(torch.optim.SGD(ps, lr=1.0), **args)


def test_clip_bound_update_matches_hand_computation():
    ps = _params_with_norms(NORMS)
    opt = _adaclip(ps)
    assert opt.pre_step()
    # C = 2: unclipped are 0.5, 1.0, 1.5 -> b = 3, fraction 3/8
    expected = 2.0 * math.exp(-0.2 * (3 / 8 - 0.5))
    assert opt.max_grad_norm == pytest.approx(expected)
    # the gradient of this step was clipped at the old bound C = 2
    clipped = sum(min(1.0, 2.0 / (n + 1e-6)) * n for n in NORMS.tolist()) / 8
    torch.testing.assert_close(ps[0].grad[0].item(), clipped)
    # second step from the new bound, after zero_grad resets the counts
    opt.zero_grad()
    ps[0].grad_sample = NORMS.double()[:, None] * torch.tensor([1.0, 0, 0], dtype=torch.float64)
    opt.pre_step()
    b = int((NORMS <= expected).sum())
    assert opt.max_grad_norm == pytest.approx(expected * math.exp(-0.2 * (b / 8 - 0.5)))


@pytest.mark.parametrize("quantile, bound", [(0.0, "min"), (1.0, "max")])
def test_clip_bound_is_clamped(quantile, bound):
    ps = _params_with_norms(NORMS)
    opt = _adaclip(
        ps,
        target_unclipped_quantile=quantile,
        clipbound_learning_rate=50.0,
        min_clipbound=1.2,
        max_clipbound=3.3,
    )
    opt.pre_step()
    assert opt.max_grad_norm == (1.2 if bound == "min" else 3.3)


def test_virtual_steps_accumulate_counts():
    ps = _params_with_norms(NORMS)
    opt = _adaclip(ps)
    opt.signal_skip_step(True)
    ps[0].grad_sample = ps[0].grad_sample[:3]  # norms 0.5, 1, 1.5: all unclipped
    assert not opt.pre_step()
    opt.zero_grad()
    assert opt.unclipped_num == 3 and opt.sample_size == 3
    ps[0].grad_sample = torch.tensor([[4.0, 0, 0]], dtype=torch.float64)
    assert opt.pre_step()
    # centred sum over the 4 samples of the logical batch: 3 * (1/2) + 1 * (-1/2) = 1
    assert opt.unclipped_frac == pytest.approx(1 / 8 + 0.5)
    assert opt.max_grad_norm == pytest.approx(2.0 * math.exp(-0.2 * (1 / 8 + 0.5 - 0.5)))


def test_noiseless_gradient_matches_flat_brute_force():
    model = small_model()
    x, y = batch(6)
    opt = AdaClipDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=0.0,
        target_unclipped_quantile=0.5,
        clipbound_learning_rate=0.2,
        max_clipbound=10.0,
        min_clipbound=0.01,
        unclipped_num_std=1.0,
        max_grad_norm=0.4,
        expected_batch_size=6,
    )
    set_grad_samples(model, x, y)
    opt.pre_step()
    for p, e in zip(
        opt.params, dp_grads(small_model(), x, y, max_grad_norm=0.4, expected_batch_size=6)
    ):
        torch.testing.assert_close(p.grad, e)


def test_gradient_noise_std_and_errors():
    assert gradient_noise_multiplier(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="unclipped_num_std"):
        gradient_noise_multiplier(1.0, 0.5)
    p = nn.Parameter(torch.zeros(40000))
    p.grad_sample = torch.zeros(2, 40000)
    opt = _adaclip(
        [p],
        noise_multiplier=1.0,
        unclipped_num_std=2.0,
        max_grad_norm=0.5,
        expected_batch_size=1,
        generator=torch.Generator().manual_seed(0),
    )
    claimed = opt._noise_std()  # the std the composition test below accounts for
    opt.pre_step()
    assert abs(p.grad.std().item() / claimed - 1) < 0.03
    assert opt.noise_multiplier == 1.0  # the accountant sees the total


def test_unclipped_count_noise_std():
    gen = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    p.grad_sample = torch.zeros(6, 1, dtype=torch.float64)  # one backward pass
    opt = _adaclip([p], unclipped_num_std=3.0, generator=gen, noise_multiplier=0.5)
    draws = []
    for _ in range(2000):
        p.summed_grad = torch.zeros(1, dtype=torch.float64)
        opt.unclipped_num, opt.sample_size = 5.0, 6
        opt.add_noise()
        # released fraction = (centred sum + noise) / n + 1/2, centred sum = 5 - 6 / 2
        draws.append((opt.unclipped_frac - 0.5) * 8 - 2.0)
    d = torch.tensor(draws)
    assert abs(d.std().item() / 3.0 - 1) < 0.08  # relative sd of the estimate: 1.6%
    assert abs(d.mean().item()) < 5 * 3.0 / math.sqrt(2000)


# ------------------------------------------------ the released statistic (Andrew et al. 2021)
def test_released_fraction_matches_centred_hand_computation_from_oracle_norms():
    # actual batch 6, expected 10: the centred statistic differs from the raw count / n
    model = small_model()
    x, y = batch(6)
    gs = oracle_grad_samples(model, x, y)
    norms = torch.cat([g.flatten(1) for g in gs.values()], dim=1).norm(dim=1)
    clip = float(norms.sort().values[1])  # 2 of 6 unclipped
    opt = AdaClipDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=0.0,
        target_unclipped_quantile=0.3,
        clipbound_learning_rate=0.7,
        max_clipbound=10.0,
        min_clipbound=1e-4,
        unclipped_num_std=1.0,
        max_grad_norm=clip,
        expected_batch_size=10,
    )
    set_grad_samples(model, x, y)
    opt.unclipped_num_std = 0.0  # noise off (the constructor validated the split)
    assert opt.pre_step()
    b = (norms <= clip).double()
    frac = float((b - 0.5).sum()) / 10 + 0.5  # = 0.4, not the raw 2 / 10
    assert opt.unclipped_frac == pytest.approx(frac)
    assert frac != pytest.approx(float(b.sum()) / 10)
    assert opt.max_grad_norm == pytest.approx(clip * math.exp(-0.7 * (frac - 0.3)))


def _released_fraction(norms, clip, n):
    """The optimizer's noiseless released fraction for one batch with these per-sample norms."""
    opt = _adaclip(_params_with_norms(norms), max_grad_norm=clip, expected_batch_size=n)
    opt.pre_step()
    return opt.unclipped_frac


def count_sensitivity(released, trials=150, seed=0):
    """Largest change of ``released(norms, clip, n)`` (in units of the sum, i.e. times ``n``) when
    one sample is added to or removed from a random batch: the add/remove sensitivity."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(trials):
        size = int(torch.randint(1, 12, (1,), generator=g))
        n = int(torch.randint(1, 20, (1,), generator=g))
        norms = torch.rand(size + 1, generator=g, dtype=torch.float64) * 4
        clip = float(torch.rand(1, generator=g)) * 4
        whole, less = released(norms, clip, n), released(norms[:-1], clip, n)
        worst = max(worst, abs(whole - less) * n)
    return worst


def test_released_statistic_has_sensitivity_one_half():
    sens = count_sensitivity(_released_fraction)
    assert sens == pytest.approx(0.5)  # <= 1/2 always, and attained


@pytest.mark.parametrize("sigma,s", [(0.5, 1.0), (1.0, 2.0), (3.0, 20.0)])
def test_gradient_and_count_releases_compose_to_one_gaussian_of_multiplier_sigma(sigma, s):
    # zCDP from first principles: a Gaussian of std `std` on a statistic of sensitivity `sens`
    # is rho = sens^2 / (2 std^2)-zCDP, and rho adds up under composition.
    def rho(sens, std):
        return sens**2 / (2 * std**2)

    clip = 0.7
    opt = _adaclip(
        _params_with_norms(NORMS), noise_multiplier=sigma, unclipped_num_std=s, max_grad_norm=clip
    )
    grad_rho = rho(clip, opt._noise_std())  # the clipped sum: sensitivity C
    count_rho = rho(count_sensitivity(_released_fraction, trials=60), s)
    assert grad_rho + count_rho == pytest.approx(rho(1.0, sigma))


def test_state_dict_is_the_wrapped_optimizers():
    ps = _params_with_norms(NORMS)
    opt = _adaclip(ps)
    opt.pre_step()
    opt2 = _adaclip(_params_with_norms(NORMS), max_grad_norm=7.0, min_clipbound=0.5)
    sd = opt.state_dict()
    # the param ids of the inner state dict line up: same single-param layout
    assert sd.keys() == {"state", "param_groups"}
    opt2.load_state_dict(sd)
    # Opacus 1.6: the clip bound and AdaClip's knobs are settings, not checkpoint state
    assert opt.max_grad_norm != 7.0 and opt2.max_grad_norm == 7.0
    assert opt2.min_clipbound == 0.5


def test_errors():
    ps = _params_with_norms(NORMS)
    with pytest.raises(ValueError, match="expected_batch_size"):
        _adaclip(ps, expected_batch_size=None, loss_reduction="sum")
    with pytest.raises(ValueError, match="unclipped_num_std"):
        _adaclip(ps, noise_multiplier=1.0, unclipped_num_std=0.4)
    with pytest.raises(ValueError, match="min_clipbound"):
        _adaclip(ps, min_clipbound=5.0, max_clipbound=1.0)
    with pytest.raises(ValueError, match="target_unclipped_quantile"):
        _adaclip(ps, target_unclipped_quantile=1.5)


def test_noise_split_message_and_check_order():
    """Opacus 1.6: base checks, then max_clipbound <= min_clipbound, then the noise split."""
    ps = _params_with_norms(NORMS)
    fragment = "noise_multiplier must be smaller than 2 * unclipped_num_std"
    for nm, s in ((1.0, 0.5), (1.0, 0.4), (3.0, 1.0)):  # equality included
        with pytest.raises(ValueError, match=fragment.replace("*", r"\*")):
            _adaclip(ps, noise_multiplier=nm, unclipped_num_std=s)
    _adaclip(ps, noise_multiplier=1.0, unclipped_num_std=0.51)  # just inside
    # several faults: the earlier check wins
    bad_split = dict(noise_multiplier=1.0, unclipped_num_std=0.1)
    with pytest.raises(ValueError, match="max_clipbound must be larger than min_clipbound"):
        _adaclip(ps, max_clipbound=0.1, min_clipbound=0.1, **bad_split)  # equal bounds refused
    with pytest.raises(ValueError, match="loss_reduction"):
        _adaclip(ps, max_clipbound=0.1, min_clipbound=1.0, loss_reduction="avg", **bad_split)
    with pytest.raises(ValueError, match="noise_multiplier must be finite"):
        _adaclip(ps, max_clipbound=0.1, min_clipbound=1.0, noise_multiplier=math.inf)
    with pytest.raises(ValueError, match="unclipped_num_std"):
        gradient_noise_multiplier(1.0, 0.5)


def test_unclipped_count_noise_goes_through_generate_noise(monkeypatch):
    """AdaClip draws the count's noise with the 1.6 helper ``_generate_noise``."""
    import opacus.optimizers.adaclipoptimizer as ada

    calls = []

    def fake(std, reference, generator=None, secure_mode=False):
        calls.append((std, reference.shape, secure_mode))
        return torch.zeros_like(reference) + 0.25

    monkeypatch.setattr(ada, "_generate_noise", fake)
    ps = _params_with_norms(NORMS)
    opt = _adaclip(ps, unclipped_num_std=3.0, clipbound_learning_rate=0.0)
    opt.pre_step()
    assert calls == [(3.0, torch.Size([]), False)]
    # 3 of 8 unclipped at C = 2: (3 - 4 + 0.25) / 8 + 1/2
    assert opt.unclipped_frac == pytest.approx((3 - 4 + 0.25) / 8 + 0.5)


def test_clip_bound_update_and_count_generator_are_written_once():
    """Both adaptive clippings (per-sample gradients and ghost) use adaclipoptimizer's."""
    from opacus.optimizers import adaclipoptimizer
    from opacus.utils.adaptive_clipping import adaptive_clipping_utils

    assert adaptive_clipping_utils.updated_clip_bound is adaclipoptimizer.updated_clip_bound
    assert adaptive_clipping_utils.cpu_generator is adaclipoptimizer.cpu_generator
    # closed form: C * exp(-eta (b - gamma)), clamped
    assert adaclipoptimizer.updated_clip_bound(
        2.0,
        0.75,
        target_unclipped_quantile=0.5,
        clipbound_learning_rate=0.2,
        min_clipbound=0.1,
        max_clipbound=10.0,
    ) == pytest.approx(2.0 * math.exp(-0.2 * 0.25))
    assert (
        adaclipoptimizer.updated_clip_bound(
            2.0,
            0.0,
            target_unclipped_quantile=0.5,
            clipbound_learning_rate=100.0,
            min_clipbound=0.1,
            max_clipbound=10.0,
        )
        == 10.0
    )
    g = torch.Generator()
    assert adaclipoptimizer.cpu_generator(g) is g
    assert adaclipoptimizer.cpu_generator(None) is None


def test_skip_step_state_is_public():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = DPOptimizer(
        torch.optim.SGD([p], lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1
    )
    assert not opt.last_step_skipped and not opt.next_step_skipped()
    opt.signal_skip_step(True)
    assert opt.next_step_skipped() and opt.next_step_skipped()  # peeking does not consume it
    p.grad_sample = torch.ones(1, 2)
    p.grad = torch.ones(2)
    opt.step()
    assert opt.last_step_skipped and not opt.next_step_skipped()

"""User-level DP: UserPoissonSampler and DPUserLevelOptimizer against hand-grouped oracles."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus import GradSampleModule
from opacus.optimizers.optimizer import DPOptimizer
from opacus.optimizers.user_level import (
    DPUserLevelOptimizer,
    per_user_sums,
    user_level_clipped_sums,
)
from opacus.utils.user_sampler import UserPoissonSampler
from tests.oracle import brute_force_grad_samples


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _mse(output, target):
    return ((output - target) ** 2).sum()


def _oracle_user_clipped_sum(grad_samples, user_ids, c):
    """By hand: loop over users, sum their rows, clip the concatenated sum, add up."""
    names = list(grad_samples)
    total = {n: torch.zeros_like(grad_samples[n][0]) for n in names}
    for u in sorted(set(user_ids)):
        rows = [i for i, v in enumerate(user_ids) if v == u]
        g = {n: sum(grad_samples[n][i] for i in rows) for n in names}
        norm = math.sqrt(sum(float((g[n] ** 2).sum()) for n in names))
        factor = min(1.0, c / (norm + 1e-6))
        for n in names:
            total[n] += factor * g[n]
    return total


@settings(max_examples=20, deadline=None)
@given(
    user_ids=st.lists(st.integers(min_value=-3, max_value=40), min_size=1, max_size=9),
    c=st.sampled_from([0.05, 0.5, 100.0]),
)
def test_user_level_clipped_sums_match_hand_grouping(user_ids, c):
    torch.manual_seed(len(user_ids))
    x = torch.randn(len(user_ids), 5)
    y = torch.randn(len(user_ids), 3)
    model = _model()
    oracle_gs = brute_force_grad_samples(model, x, loss_fn=_mse, targets=y)
    expected = _oracle_user_clipped_sum(oracle_gs, user_ids, c)
    got = user_level_clipped_sums(list(oracle_gs.values()), torch.tensor(user_ids), c)
    for (name, exp), act in zip(expected.items(), got):
        torch.testing.assert_close(act, exp, atol=1e-5, rtol=1e-4, msg=name)


def test_per_user_sums_orders_users_by_id():
    g = torch.arange(8.0).view(4, 2)
    (sums,) = per_user_sums([g], torch.tensor([7, 2, 7, 2]))
    torch.testing.assert_close(sums, torch.tensor([[2.0 + 6.0, 3.0 + 7.0], [0.0 + 4.0, 1.0 + 5.0]]))


def _optimizer(model, cls=DPUserLevelOptimizer, expected=3, **kwargs):
    return cls(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=0.3,
        expected_batch_size=expected,
        **kwargs,
    )


def test_optimizer_step_equals_oracle_through_grad_sample_module():
    torch.manual_seed(1)
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    users = [4, 9, 4, 4, 1, 9]
    model = _model()
    oracle = _oracle_user_clipped_sum(
        brute_force_grad_samples(model, x, loss_fn=_mse, targets=y), users, 0.3
    )
    gsm = GradSampleModule(model, loss_reduction="sum")
    opt = _optimizer(gsm, loss_reduction="mean")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _mse(gsm(x), y).backward()
    opt.set_user_ids(torch.tensor(users))
    opt.step()
    for n, p in model.named_parameters():
        # lr 1, mean over the expected 3 users: theta' = theta - clipped_sum / 3
        torch.testing.assert_close(before[n] - p.detach(), oracle[n] / 3, atol=1e-5, rtol=1e-4)


def test_virtual_steps_accumulate_user_level_sums():
    torch.manual_seed(2)
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    users = [0, 0, 1, 2, 2, 2]
    model = _model()
    oracle = _oracle_user_clipped_sum(
        brute_force_grad_samples(model, x, loss_fn=_mse, targets=y), users, 0.3
    )
    gsm = GradSampleModule(model, loss_reduction="sum")
    opt = _optimizer(gsm, loss_reduction="sum")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for rows, skip in (([0, 1, 2], True), ([3, 4, 5], False)):  # users kept whole per chunk
        opt.zero_grad()
        _mse(gsm(x[rows]), y[rows]).backward()
        opt.set_user_ids(torch.tensor([users[i] for i in rows]))
        opt.signal_skip_step(do_skip=skip)
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), oracle[n], atol=1e-5, rtol=1e-4)


def test_one_example_per_user_is_example_level_clipping():
    torch.manual_seed(3)
    x, y = torch.randn(5, 5), torch.randn(5, 3)
    results = []
    for cls, kwargs in ((DPUserLevelOptimizer, {}), (DPOptimizer, {})):
        model = _model()
        gsm = GradSampleModule(model)
        opt = _optimizer(gsm, cls=cls, **kwargs)
        nn.functional.mse_loss(gsm(x), y).backward()
        if cls is DPUserLevelOptimizer:
            opt.set_user_ids(torch.arange(5))
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_optimizer_refuses_missing_or_misaligned_user_ids():
    model = _model()
    gsm = GradSampleModule(model)
    opt = _optimizer(gsm)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    nn.functional.mse_loss(gsm(x), y).backward()
    with pytest.raises(ValueError, match="DPUserLevelOptimizer.*set_user_ids"):
        opt.step()
    opt.zero_grad()
    nn.functional.mse_loss(gsm(x), y).backward()
    opt.set_user_ids(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"user_ids must have shape \(4,\)"):
        opt.step()
    opt.zero_grad()
    nn.functional.mse_loss(gsm(x), y).backward()
    opt.set_user_ids(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="integer"):
        opt.step()


def test_user_ids_are_used_by_one_step_only():
    model = _model()
    gsm = GradSampleModule(model)
    opt = _optimizer(gsm)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    nn.functional.mse_loss(gsm(x), y).backward()
    opt.set_user_ids(torch.tensor([0, 0, 1, 1]))
    opt.step()
    assert opt.user_ids is None
    opt.zero_grad()
    nn.functional.mse_loss(gsm(x), y).backward()
    with pytest.raises(ValueError, match="set_user_ids"):
        opt.step()


# ---------------------------------------------------------------------------- sampler
def test_sampler_keeps_users_whole_and_grouped():
    user_ids = ["a", "b", "a", "c", "b", "a", "d"]
    sampler = UserPoissonSampler(
        user_ids=user_ids, sample_rate=0.5, generator=torch.Generator().manual_seed(0), steps=50
    )
    assert sampler.num_users == 4 and sampler.num_samples == 7 and len(sampler) == 50
    members = {u: {i for i, v in enumerate(user_ids) if v == u} for u in set(user_ids)}
    for batch in sampler:
        users_in = [user_ids[i] for i in batch]
        for u in set(users_in):
            assert {i for i in batch if user_ids[i] == u} == members[u]
        # grouped: a user's examples are consecutive
        runs = [u for k, u in enumerate(users_in) if k == 0 or users_in[k - 1] != u]
        assert len(runs) == len(set(users_in))


def test_sampler_includes_each_user_with_probability_q():
    # 200 users, 400 draws: each user's inclusion count is Binomial(400, 0.2) (sd 8);
    # the total over all users is Binomial(80000, 0.2) (mean 16000, sd ~113).
    user_ids = [i // 3 for i in range(600)]
    sampler = UserPoissonSampler(
        user_ids=user_ids, sample_rate=0.2, generator=torch.Generator().manual_seed(1), steps=400
    )
    counts = torch.zeros(200)
    for batch in sampler:
        users = torch.tensor(sorted({user_ids[i] for i in batch}), dtype=torch.long)
        counts[users] += 1
    assert abs(counts.sum().item() - 16000) < 5 * 113
    assert counts.min() > 80 - 6 * 8 and counts.max() < 80 + 6 * 8
    assert sampler.expected_batch_size == pytest.approx(40.0)


def test_sampler_defaults_and_errors():
    s = UserPoissonSampler(user_ids=torch.tensor([3, 3, 5]), sample_rate=0.25)
    assert len(s) == 4 and s.user_index.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="UserPoissonSampler.*sample_rate"):
        UserPoissonSampler(user_ids=[0, 1], sample_rate=0.0)
    with pytest.raises(ValueError, match="UserPoissonSampler.*empty"):
        UserPoissonSampler(user_ids=[], sample_rate=0.5)

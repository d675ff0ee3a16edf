"""DPOptimizer against brute-force DP-SGD (tests/optimizers/dp_reference.py, tests.oracle)."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.optimizers import DPOptimizer
from opacus.optimizers.utils import params
from tests.optimizers.dp_reference import (
    batch,
    clipped_sum_flat,
    dp_grads,
    set_grad_samples,
    small_model,
    step_with_grads,
)

INNER = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


def _dp(model, inner="sgd", **kw):
    kw.setdefault("noise_multiplier", 0.0)
    kw.setdefault("max_grad_norm", 1.0)
    kw.setdefault("expected_batch_size", 8)
    return DPOptimizer(INNER[inner](model.parameters()), **kw)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("max_grad_norm", [0.05, 1e3])
def test_noiseless_step_matches_brute_force(inner, loss_reduction, max_grad_norm):
    model = small_model()
    ref = copy.deepcopy(model)
    dp = _dp(
        model,
        inner,
        max_grad_norm=max_grad_norm,
        loss_reduction=loss_reduction,
        expected_batch_size=10,
    )
    ref_opt = INNER[inner](ref.parameters())
    for step in range(2):  # two steps: the inner optimizer's state (momentum, Adam) is shared
        x, y = batch(7, seed=step)
        set_grad_samples(model, x, y)
        dp.step()
        dp.zero_grad()
        grads = dp_grads(
            ref,
            x,
            y,
            max_grad_norm=max_grad_norm,
            expected_batch_size=10,
            loss_reduction=loss_reduction,
        )
        step_with_grads(ref, ref_opt, grads)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)


def test_clipping_bounds_each_sample_norm():
    # With C tiny every sample is clipped: the summed gradient has norm <= B * C.
    model = small_model()
    dp = _dp(model, max_grad_norm=1e-3, loss_reduction="sum")
    x, y = batch(6)
    set_grad_samples(model, x, y)
    dp.clip_and_accumulate()
    total = torch.cat([p.summed_grad.reshape(-1) for p in dp.params]).norm()
    assert total <= 6 * 1e-3 + 1e-12
    assert total > 0.5 * 1e-3


@settings(max_examples=15, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4),
    b=st.integers(0, 6),
    c=st.floats(0.01, 10.0),
    seed=st.integers(0, 1000),
)
def test_clip_and_accumulate_property(shapes, b, c, seed):
    g = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    for p in ps:
        scale = torch.rand(b, *([1] * p.dim()), generator=g, dtype=torch.float64) * 5
        p.grad_sample = torch.randn(b, *p.shape, generator=g, dtype=torch.float64) * scale
    dp = DPOptimizer(
        torch.optim.SGD(ps, lr=1.0), noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=3
    )
    dp.clip_and_accumulate()
    expected = clipped_sum_flat([p.grad_sample for p in ps], c)
    for p, e in zip(ps, expected):
        assert p.summed_grad.shape == p.shape
        torch.testing.assert_close(p.summed_grad, e.reshape(p.shape), atol=1e-10, rtol=1e-8)


def test_noise_std_matches_sigma_c_over_b():
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.zeros(200, 100)), nn.Parameter(torch.zeros(5000))]
    for p in ps:
        p.grad_sample = torch.zeros(4, *p.shape)
    sigma, c, b = 1.3, 0.7, 16
    gen = torch.Generator().manual_seed(7)
    dp = DPOptimizer(
        torch.optim.SGD(ps, lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=c,
        expected_batch_size=b,
        generator=gen,
    )
    assert dp.pre_step()
    expected_std = sigma * c / b
    for p in ps:
        g = p.grad.reshape(-1).double()
        n = g.numel()
        # chi-square: n * s^2 / std^2 ~ chi2(n); 5 sigma band of its normal approximation
        chi2 = (g**2).sum() / expected_std**2
        assert abs(chi2 - n) < 5 * math.sqrt(2 * n), (chi2, n)
        assert abs(g.mean()) < 5 * expected_std / math.sqrt(n)
    # independent across parameters
    a, bb = ps[0].grad.reshape(-1)[:5000], ps[1].grad.reshape(-1)
    corr = torch.corrcoef(torch.stack([a, bb]))[0, 1]
    assert abs(corr) < 5 / math.sqrt(5000)


def test_generator_makes_noise_reproducible():
    def run(seed):
        model = small_model()
        dp = _dp(model, noise_multiplier=1.0, generator=torch.Generator().manual_seed(seed))
        set_grad_samples(model, *batch(4))
        dp.step()
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


@pytest.mark.parametrize("noise_multiplier", [0.0, 1.0])
def test_virtual_steps_equal_one_logical_step(noise_multiplier):
    x, y = batch(9, seed=3)
    chunks = [(x[:2], y[:2]), (x[2:6], y[2:6]), (x[6:], y[6:])]

    model = small_model()
    dp = _dp(
        model,
        "adam",
        noise_multiplier=noise_multiplier,
        expected_batch_size=9,
        generator=torch.Generator().manual_seed(5),
    )
    hook_calls = []
    dp.attach_step_hook(lambda opt: hook_calls.append(opt))
    for k, (xc, yc) in enumerate(chunks):
        if k < 2:
            dp.signal_skip_step(do_skip=True)
        set_grad_samples(model, xc, yc)
        before = [p.detach().clone() for p in model.parameters()]
        dp.step()
        dp.zero_grad()
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert moved == (k == 2)
    assert hook_calls == [dp]

    union = small_model()
    dp_union = _dp(
        union,
        "adam",
        noise_multiplier=noise_multiplier,
        expected_batch_size=9,
        generator=torch.Generator().manual_seed(5),
    )
    set_grad_samples(union, x, y)
    dp_union.step()
    for p, q in zip(model.parameters(), union.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)


def test_zero_grad_keeps_summed_grad_only_after_skip():
    model = small_model()
    dp = _dp(model)
    set_grad_samples(model, *batch(3))
    dp.signal_skip_step()
    assert dp.step() is None
    dp.zero_grad()
    assert all(p.grad_sample is None and p.summed_grad is not None for p in dp.params)
    set_grad_samples(model, *batch(3, seed=2))
    dp.step()
    dp.zero_grad()
    assert all(p.grad_sample is None and p.summed_grad is None for p in dp.params)


@pytest.mark.parametrize("noise_multiplier", [0.0, 2.0])
def test_empty_batch(noise_multiplier):
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )
    for p in model.parameters():
        p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype)
    assert dp.pre_step()
    for p in dp.params:
        assert torch.equal(p.summed_grad, torch.zeros_like(p))
        assert (p.grad != 0).any() == (noise_multiplier > 0)
    dp.original_optimizer.step()
    changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert changed == (noise_multiplier > 0)


def test_grad_sample_list_is_concatenated_and_counts_iterations():
    model = small_model()
    x, y = batch(6)
    dp = _dp(model, max_grad_norm=0.3, expected_batch_size=3)
    set_grad_samples(model, x[:3], y[:3])
    first = {p: p.grad_sample for p in model.parameters()}
    set_grad_samples(model, x[3:], y[3:])
    for p in model.parameters():
        p.grad_sample = [first[p], p.grad_sample]
    assert dp.accumulated_iterations == 2
    assert dp.pre_step()
    expected = dp_grads(small_model(), x, y, max_grad_norm=0.3, expected_batch_size=6)
    for p, e in zip(dp.params, expected):
        torch.testing.assert_close(p.grad, e, atol=1e-10, rtol=1e-8)


def test_state_dict_is_the_wrapped_optimizers_and_dp_settings_are_not_restored():
    model = small_model()
    dp = _dp(model, "adam", noise_multiplier=0.0, generator=torch.Generator().manual_seed(0))
    for k in range(2):
        set_grad_samples(model, *batch(5, seed=k))
        dp.step()
        dp.zero_grad()
    dp.signal_skip_step(True)
    sd = dp.state_dict()
    # exactly the wrapped optimizer's state dict (Opacus 1.6)
    inner = dp.original_optimizer.state_dict()
    assert sd.keys() == inner.keys() == {"state", "param_groups"}
    assert sd["param_groups"] == inner["param_groups"]

    model2 = copy.deepcopy(model)
    dp2 = _dp(model2, "adam", noise_multiplier=2.0, max_grad_norm=3.0, expected_batch_size=4)
    dp2.load_state_dict(copy.deepcopy(sd))
    # DP settings are the caller's: not part of the checkpoint
    assert dp.noise_multiplier != dp2.noise_multiplier
    assert (dp2.noise_multiplier, dp2.max_grad_norm, dp2.expected_batch_size) == (2.0, 3.0, 4)
    assert dp2._step_skip_queue == []
    for p, q in zip(dp.params, dp2.params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(dp.state[p][key], dp2.state[q][key])
    # identical continuation with equal DP settings: the inner state was fully restored
    dp._step_skip_queue.clear()
    dp2.noise_multiplier, dp2.max_grad_norm, dp2.expected_batch_size = 0.0, 1.0, 8
    for opt, m in ((dp, model), (dp2, model2)):
        set_grad_samples(m, *batch(5, seed=9))
        opt.step()
        opt.zero_grad()
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q)


def test_checkpoint_with_legacy_dp_optimizer_entry_loads_and_is_ignored():
    model = small_model()
    dp = _dp(model, "sgd", noise_multiplier=1.5)
    sd = dict(dp.state_dict())
    sd["dp_optimizer"] = {"noise_multiplier": 0.0, "max_grad_norm": 9.0}
    dp.load_state_dict(sd)
    assert dp.noise_multiplier == 1.5 and dp.max_grad_norm == 1.0
    assert "dp_optimizer" not in dp.original_optimizer.state_dict()


def test_secure_mode_std_and_unpredictability():
    ps = [nn.Parameter(torch.zeros(40000))]
    ps[0].grad_sample = torch.zeros(2, 40000)
    dp = DPOptimizer(
        torch.optim.SGD(ps, lr=1.0),
        noise_multiplier=2.0,
        max_grad_norm=0.5,
        expected_batch_size=1,
        loss_reduction="mean",
        secure_mode=True,
    )
    dp.pre_step()
    first = ps[0].grad.clone()
    std = first.std().item()
    assert abs(std - 1.0) < 0.03  # n=40000: relative sd of the estimate is 0.35%
    dp.zero_grad()
    ps[0].grad_sample = torch.zeros(2, 40000)
    dp.pre_step()
    assert not torch.equal(first, ps[0].grad)
    with pytest.raises(ValueError, match="secure_mode"):
        DPOptimizer(
            torch.optim.SGD(ps, lr=1.0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=1,
            secure_mode=True,
            generator=torch.Generator(),
        )


def test_step_with_closure_returns_loss():
    model = small_model()
    dp = _dp(model)
    x, y = batch(4)

    def closure():
        set_grad_samples(model, x, y)
        return torch.tensor(3.0)

    assert dp.step(closure) == 3.0


def test_shares_state_with_inner_optimizer_and_lr_scheduler_works():
    model = small_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    dp = DPOptimizer(inner, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=2)
    assert dp.param_groups is inner.param_groups
    assert dp.state is inner.state and dp.defaults is inner.defaults
    assert params(dp) == list(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(dp, step_size=1, gamma=0.1)
    set_grad_samples(model, *batch(2))
    dp.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)
    assert "DPOptimizer" in repr(dp)


def test_deepcopy_and_pickle():
    import pickle

    model = small_model()
    dp = _dp(model, "adam", noise_multiplier=0.0)
    clone = copy.deepcopy((model, dp))[1]
    clone2 = pickle.loads(pickle.dumps(dp))
    for c in (clone, clone2):
        assert c.noise_multiplier == dp.noise_multiplier and c.max_grad_norm == dp.max_grad_norm
        assert isinstance(c.original_optimizer, torch.optim.Adam)
        assert c.param_groups is c.original_optimizer.param_groups


def test_frozen_params_are_ignored():
    model = small_model()
    model[0].weight.requires_grad_(False)
    dp = _dp(model)
    assert len(dp.params) == 3
    set_grad_samples(model, *batch(3))
    dp.step()


def test_errors():
    model = small_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="expected_batch_size"):
        DPOptimizer(sgd, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=None)
    DPOptimizer(
        sgd, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=None, loss_reduction="sum"
    )
    with pytest.raises(ValueError, match="loss_reduction"):
        DPOptimizer(
            sgd,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=2,
            loss_reduction="avg",
        )
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPOptimizer(sgd, noise_multiplier=-1.0, max_grad_norm=1.0, expected_batch_size=2)
    with pytest.raises(TypeError, match="DPPerLayerOptimizer"):
        DPOptimizer(sgd, noise_multiplier=1.0, max_grad_norm=[1.0, 2.0], expected_batch_size=2)
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPOptimizer(sgd, noise_multiplier=1.0, max_grad_norm=0.0, expected_batch_size=2)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        DPOptimizer(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2)

    dp = DPOptimizer(sgd, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2)
    set_grad_samples(model, *batch(3))
    model[0].bias.grad_sample = None
    with pytest.raises(ValueError, match=r"parameter 1 .*model\.train\(\)"):
        dp.step()
    del model[0].bias.grad_sample
    with pytest.raises(ValueError, match=r"parameter 1 .*are you using GradSampleModule"):
        dp.step()
    with pytest.raises(ValueError, match="are you using GradSampleModule"):
        dp.accumulated_iterations
    model[0].bias.grad_sample = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch size"):
        dp.step()


def _ddp_flat_worker(rank, world_size, init_file):
    import torch.distributed as dist

    from opacus.optimizers import DistributedDPOptimizer
    from tests.optimizers.dp_reference import init_gloo

    init_gloo(rank, world_size, init_file)
    try:
        x, y = batch(8, seed=4)
        shard = slice(rank * 4, rank * 4 + 4)
        for loss_reduction in ("mean", "sum"):
            for noise_multiplier in (0.0, 1.0):
                kw = dict(
                    noise_multiplier=noise_multiplier,
                    max_grad_norm=0.5,
                    loss_reduction=loss_reduction,
                )
                model = small_model()
                opt = DistributedDPOptimizer(
                    torch.optim.SGD(model.parameters(), lr=0.1),
                    expected_batch_size=4,
                    generator=torch.Generator().manual_seed(11),
                    **kw,
                )
                assert (opt.rank, opt.world_size) == (rank, world_size)
                set_grad_samples(model, x[shard], y[shard])
                opt.step()
                # one process, the whole batch, the same noise draw: must agree
                ref = small_model()
                ref_opt = DPOptimizer(
                    torch.optim.SGD(ref.parameters(), lr=0.1),
                    expected_batch_size=8,
                    generator=torch.Generator().manual_seed(11),
                    **kw,
                )
                set_grad_samples(ref, x, y)
                ref_opt.step()
                for p, q in zip(model.parameters(), ref.parameters()):
                    torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)
        # leave together: gloo can abort a rank whose peer tears down first
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_dp_optimizer_two_processes():
    from tests.optimizers.dp_reference import run_distributed

    run_distributed(_ddp_flat_worker, 2)


def test_distributed_optimizer_needs_process_group():
    from opacus.optimizers import DistributedDPOptimizer

    model = small_model()
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=2,
        )


@pytest.mark.parametrize(
    "clipping, distributed, mode, expected",
    [
        ("flat", False, "hooks", "DPOptimizer"),
        ("flat", True, "hooks", "DistributedDPOptimizer"),
        ("flat", False, None, "DPOptimizer"),
        ("flat", False, "functorch", "DPOptimizer"),
        ("per_layer", False, "hooks", "DPPerLayerOptimizer"),
        ("per_layer", True, "hooks", "DistributedPerLayerOptimizer"),
        ("per_layer", True, "ew", "SimpleDistributedPerLayerOptimizer"),
        ("per_layer", True, "functorch", "SimpleDistributedPerLayerOptimizer"),
        ("adaptive", False, "hooks", "AdaClipDPOptimizer"),
        ("flat", False, "ghost", "DPOptimizerFastGradientClipping"),
        ("flat", True, "ghost", "DistributedDPOptimizerFastGradientClipping"),
        ("flat", True, "ghost_fsdp", "FSDPOptimizerFastGradientClipping"),
    ],
)
def test_get_optimizer_class(clipping, distributed, mode, expected):
    from opacus.optimizers import get_optimizer_class

    assert get_optimizer_class(clipping, distributed, mode).__name__ == expected


@pytest.mark.parametrize(
    "clipping, distributed, mode",
    [
        ("per_layer", False, "ghost"),
        ("adaptive", False, "ghost"),
        ("adaptive", True, "hooks"),
        ("fancy", False, "hooks"),
    ],
)
def test_get_optimizer_class_errors(clipping, distributed, mode):
    from opacus.optimizers import get_optimizer_class

    with pytest.raises(ValueError, match="clipping"):
        get_optimizer_class(clipping, distributed, mode)


# ------------------------------------------------ per-step cost linear in the number of tensors
def _count_params_reads(monkeypatch, n_tensors: int, optimizer_cls=DPOptimizer, **kw) -> dict:
    ps = [nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in range(n_tensors)]
    opt = optimizer_cls(
        torch.optim.SGD(ps, lr=0.1),
        noise_multiplier=1.0,
        expected_batch_size=3,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    reads = []
    original = DPOptimizer.params

    def counting(self):
        reads.append(1)
        return original.fget(self)

    monkeypatch.setattr(DPOptimizer, "params", property(counting))
    counts = {}
    for stage, run in (
        ("step", opt.step),
        ("zero_grad", opt.zero_grad),
        ("virtual step", lambda: (opt.signal_skip_step(True), opt.step())),
    ):
        for p in ps:
            p.grad_sample = torch.ones(3, 2, dtype=torch.float64)
        reads.clear()
        run()
        counts[stage] = len(reads)
    for p in ps:
        p.summed_grad = torch.zeros(2, dtype=torch.float64)
    reads.clear()
    opt.add_noise()
    counts["add_noise"] = len(reads)
    monkeypatch.setattr(DPOptimizer, "params", original)
    return counts


@pytest.mark.parametrize(
    "optimizer_cls,kw",
    [
        (DPOptimizer, {"max_grad_norm": 1.0}),
        ("DPPerLayerOptimizer", {"max_grad_norm": None}),
    ],
)
def test_params_is_read_a_constant_number_of_times_per_step(monkeypatch, optimizer_cls, kw):
    """Issue 17: ``add_noise`` indexed ``self.params[i]`` per tensor (a fresh list each time):
    quadratic. Every stage must read ``params`` O(1) times, whatever the number of tensors."""
    from opacus.optimizers import DPPerLayerOptimizer

    counts = {}
    for n in (3, 300):
        if optimizer_cls == "DPPerLayerOptimizer":
            cls, args = DPPerLayerOptimizer, {"max_grad_norm": [1.0] * n}
        else:
            cls, args = optimizer_cls, kw
        counts[n] = _count_params_reads(monkeypatch, n, cls, **args)
    assert counts[3] == counts[300]
    assert all(c <= 6 for c in counts[300].values()), counts[300]
    assert counts[300]["add_noise"] == 1


@pytest.mark.parametrize("value", [1.5, torch.tensor(1.5), torch.tensor(1.5, dtype=torch.float64)])
def test_noise_multiplier_as_0d_tensor_is_a_float(value):
    model = small_model()
    dp = _dp(model, noise_multiplier=value, max_grad_norm=torch.tensor(0.5))
    assert type(dp.noise_multiplier) is float and dp.noise_multiplier == 1.5
    assert type(dp.max_grad_norm) is float and dp.max_grad_norm == 0.5
    set_grad_samples(model, *batch(3))
    dp.step()  # noise and scaling with plain floats


@pytest.mark.parametrize("name", ["noise_multiplier", "max_grad_norm"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), torch.tensor(math.inf)])
def test_non_finite_settings_are_refused_by_name(name, bad):
    model = small_model()
    with pytest.raises(ValueError, match=f"DPOptimizer: {name} must be finite"):
        _dp(model, **{name: bad})


def test_non_scalar_settings_are_refused_by_name():
    model = small_model()
    with pytest.raises(TypeError, match="noise_multiplier must be a real number or a 0-d"):
        _dp(model, noise_multiplier=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="max_grad_norm must be a real number"):
        _dp(model, max_grad_norm="1.0")
    from opacus.optimizers import DPPerLayerOptimizer

    with pytest.raises(ValueError, match=r"max_grad_norm\[1\] must be finite"):
        DPPerLayerOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=[1.0, float("inf"), 1.0, 1.0],
            expected_batch_size=2,
        )

"""Per-layer clipping optimizers against brute-force per-parameter clipping."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from opacus.optimizers import (
    DistributedPerLayerOptimizer,
    DPPerLayerOptimizer,
    SimpleDistributedPerLayerOptimizer,
)
from opacus.optimizers.ddp_perlayeroptimizer import _clip_and_accumulate_parameter
from tests.optimizers.dp_reference import (
    batch,
    dp_grads,
    init_gloo,
    run_distributed,
    set_grad_samples,
    small_model,
    step_with_grads,
)

NORMS = [0.3, 0.05, 1.0, 0.02]


@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_noiseless_step_matches_brute_force(inner, loss_reduction):
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5),
        "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    }[inner]
    model = small_model()
    ref = copy.deepcopy(model)
    dp = DPPerLayerOptimizer(
        make(model.parameters()),
        noise_multiplier=0.0,
        max_grad_norm=NORMS,
        expected_batch_size=6,
        loss_reduction=loss_reduction,
    )
    ref_opt = make(ref.parameters())
    for step in range(2):
        x, y = batch(6, seed=step)
        set_grad_samples(model, x, y)
        dp.step()
        dp.zero_grad()
        step_with_grads(
            ref,
            ref_opt,
            dp_grads(
                ref,
                x,
                y,
                max_grad_norm=NORMS,
                expected_batch_size=6,
                loss_reduction=loss_reduction,
                per_layer=True,
            ),
        )
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)


def test_per_layer_differs_from_flat():
    # guards against the per-layer optimizer silently clipping the whole vector
    model = small_model()
    x, y = batch(6)
    flat = dp_grads(
        model, x, y, max_grad_norm=math.sqrt(sum(c * c for c in NORMS)), expected_batch_size=6
    )
    dp = DPPerLayerOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=NORMS,
        expected_batch_size=6,
    )
    set_grad_samples(model, x, y)
    dp.pre_step()
    assert any(not torch.allclose(p.grad, f) for p, f in zip(dp.params, flat))


def test_noise_uses_l2_norm_of_bounds():
    ps = [nn.Parameter(torch.zeros(30000)), nn.Parameter(torch.zeros(30000))]
    for p in ps:
        p.grad_sample = torch.zeros(3, 30000)
    dp = DPPerLayerOptimizer(
        torch.optim.SGD(ps, lr=1.0),
        noise_multiplier=2.0,
        max_grad_norm=[0.3, 0.4],
        expected_batch_size=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert dp.max_grad_norm == pytest.approx(0.5)
    dp.pre_step()
    for p in ps:
        assert abs(p.grad.std().item() / (2.0 * 0.5) - 1) < 0.03


def test_setting_total_bound_rescales_every_layer():
    model = small_model()
    dp = DPPerLayerOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=NORMS,
        expected_batch_size=6,
    )
    total = dp.max_grad_norm
    dp.max_grad_norm = 2 * total
    assert dp.max_grad_norms == pytest.approx([2 * c for c in NORMS])
    assert dp.max_grad_norm == pytest.approx(2 * total)
    with pytest.raises(ValueError, match="max_grad_norm"):
        dp.max_grad_norm = 0.0


def test_state_dict_keeps_per_layer_bounds():
    model = small_model()
    dp = DPPerLayerOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=NORMS,
        expected_batch_size=6,
    )
    dp.max_grad_norm = 3.0
    dp2 = DPPerLayerOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=[1.0] * 4,
        expected_batch_size=6,
    )
    sd = dp.state_dict()
    assert sd.keys() == {"state", "param_groups"}
    dp2.load_state_dict(sd)
    # Opacus 1.6: clip bounds are DP settings, not checkpoint state
    assert dp2.max_grad_norms == [1.0] * 4
    assert dp2.max_grad_norm == pytest.approx(2.0)


def test_errors():
    model = small_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="4 trainable parameters"):
        DPPerLayerOptimizer(
            sgd, noise_multiplier=1.0, max_grad_norm=[1.0, 2.0], expected_batch_size=2
        )
    with pytest.raises(TypeError, match="list"):
        DPPerLayerOptimizer(sgd, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2)
    with pytest.raises(ValueError, match="> 0"):
        DPPerLayerOptimizer(
            sgd, noise_multiplier=1.0, max_grad_norm=[1.0, 0.0, 1.0, 1.0], expected_batch_size=2
        )


def _hooks_release_once(rank):
    """DistributedPerLayerOptimizer clips and releases in the gradient hooks: a second step, a
    forgotten zero_grad and model.zero_grad are refused as in DPOptimizer (no DDP wrapper here,
    so a refused backward leaves no collective pending)."""
    lin = nn.Linear(3, 1, bias=False).double()
    opt = DistributedPerLayerOptimizer(
        torch.optim.SGD(lin.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=[1.0],
        expected_batch_size=2,
        loss_reduction="sum",
    )
    x = 10.0 * torch.eye(3, dtype=torch.float64)[:2]

    def backward(grad_sample):
        lin.weight.grad_sample = grad_sample
        lin(x).sum().backward()

    opt.zero_grad()
    backward(x[:, None, :].clone())
    before = lin.weight.detach().clone()
    opt.step()
    # each row clipped to norm 1: -(e_0 + e_1) (up to the 1e-6 of the factor), times the world
    # size that DDP's average would undo ("sum"; no DDP wrapper here)
    torch.testing.assert_close(
        before - lin.weight.detach(),
        torch.tensor([[2.0, 2.0, 0.0]], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    with pytest.raises(ValueError, match="no gradients released since the last step"):
        opt.step()
    with pytest.raises(ValueError, match="already used by an earlier optimizer step"):
        backward([lin.weight.grad_sample, x[:, None, :].clone()])  # forgot zero_grad
    opt.zero_grad()
    lin.weight.grad = None
    backward(x[:, None, :].clone())
    opt.step()
    lin.weight.grad_sample = None  # model.zero_grad of a GradSampleModule instead
    lin.weight.grad = None
    with pytest.raises(ValueError, match="summed_grad was already used"):
        backward(x[:, None, :].clone())
    opt.zero_grad()
    lin.weight.grad = None
    # the 1.6 helper: clipped per-parameter sum on p's device
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad_sample = torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.0, 0.4]], dtype=torch.float64)
    _clip_and_accumulate_parameter(p, 1.0)
    factor = 1.0 / (5.0 + 1e-6)
    expected = factor * torch.tensor([3.0, 4.0, 0.0]) + torch.tensor([0.3, 0.0, 0.4])
    torch.testing.assert_close(p.summed_grad, expected.double())
    assert p.summed_grad.device == p.device
    with pytest.raises(ValueError, match="already used"):
        _clip_and_accumulate_parameter(p, 1.0)


def _ddp_per_layer_worker(rank, world_size, init_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from opacus.optimizers import DPPerLayerOptimizer as Single

    init_gloo(rank, world_size, init_file)
    try:
        x, y = batch(8, seed=4)
        shard = slice(rank * 4, rank * 4 + 4)
        for loss_reduction in ("mean", "sum"):
            for noise_multiplier in (0.0, 1.0):
                kw = dict(
                    noise_multiplier=noise_multiplier,
                    max_grad_norm=NORMS,
                    loss_reduction=loss_reduction,
                )
                ref = small_model()
                ref_opt = Single(
                    torch.optim.SGD(ref.parameters(), lr=0.1),
                    expected_batch_size=8,
                    generator=torch.Generator().manual_seed(3),
                    **kw,
                )
                set_grad_samples(ref, x, y)
                ref_opt.step()

                # clipping at step + explicit all-reduce
                model = small_model()
                opt = SimpleDistributedPerLayerOptimizer(
                    torch.optim.SGD(model.parameters(), lr=0.1),
                    expected_batch_size=4,
                    generator=torch.Generator().manual_seed(3),
                    **kw,
                )
                set_grad_samples(model, x[shard], y[shard])
                opt.step()
                for p, q in zip(model.parameters(), ref.parameters()):
                    torch.testing.assert_close(
                        p, q, atol=1e-10, rtol=1e-8, msg=f"{loss_reduction} {noise_multiplier}"
                    )

                if noise_multiplier > 0:
                    continue  # the hooks draw noise in backward order: checked statistically
                # clipping in gradient hooks during backward, reduced by torch DDP; two physical
                # batches per rank (a virtual step) to exercise accumulation in the hooks
                model = small_model()
                ddp = DDP(model)
                opt = DistributedPerLayerOptimizer(
                    torch.optim.SGD(model.parameters(), lr=0.1),
                    expected_batch_size=4,
                    generator=torch.Generator().manual_seed(3),
                    **kw,
                )
                calls = []
                opt.attach_step_hook(calls.append)
                halves = [slice(rank * 4, rank * 4 + 1), slice(rank * 4 + 1, rank * 4 + 4)]
                for k, half in enumerate(halves):
                    if k == 0:
                        opt.signal_skip_step(True)
                    # set before backward (as GradSampleModule does), from an identical copy
                    set_grad_samples(model, x[half], y[half], source=small_model())
                    ddp(x[half]).sum().backward()
                    opt.step()
                    opt.zero_grad()
                assert calls == [opt]
                for p, q in zip(model.parameters(), ref.parameters()):
                    torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)
        # noise in the hooks: added once (rank 0) for the global batch, so after DDP's average
        # the std is sigma * C / (B_local * world_size); noise on every rank would be sqrt(2) more
        torch.manual_seed(rank + 100)
        big = nn.Linear(200, 100, bias=False)
        ddp = DDP(big)
        opt = DistributedPerLayerOptimizer(
            torch.optim.SGD(big.parameters(), lr=1.0),
            noise_multiplier=2.0,
            max_grad_norm=[0.5],
            expected_batch_size=4,
        )
        big.weight.grad_sample = torch.zeros(4, 100, 200)
        ddp(torch.zeros(4, 200)).sum().backward()
        std = big.weight.grad.std().item()
        assert abs(std / (2.0 * 0.5 / 8) - 1) < 0.05, std
        _hooks_release_once(rank)
        # leave together: gloo can abort a rank whose peer tears down first
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_per_layer_two_processes():
    run_distributed(_ddp_per_layer_worker, 2)

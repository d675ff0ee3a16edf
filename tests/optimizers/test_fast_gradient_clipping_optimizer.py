"""Fast gradient clipping: DPOptimizerFastGradientClipping (+ DDP / FSDP variants) and the
double-backward loss wrapper, against brute-force clipped sums (tests.oracle)."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from opacus.optimizers import (
    DPOptimizer,
    DPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
)
from opacus.utils.fast_gradient_clipping_utils import (
    ClippedSumHooks,
    DPLossFastGradientClipping,
    DPTensorFastGradientClipping,
    double_backward,
    per_sample_loss,
)
from tests.optimizers.dp_reference import (
    batch,
    clipped_sum_flat,
    dp_grads,
    init_gloo,
    oracle_grad_samples,
    reference_dp_step,
    run_distributed,
    set_grad_samples,
    small_model,
)


def _oracle_clipped_sums(model, x, y, c):
    gs = oracle_grad_samples(model, x, y)
    return clipped_sum_flat([gs[n] for n, _ in model.named_parameters()], c)


def _oracle_coefs(model, x, y, c):
    gs = oracle_grad_samples(model, x, y)
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in gs.values()], dim=1)
    return (c / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)


def _fgc(model, **kw):
    kw.setdefault("noise_multiplier", 0.0)
    kw.setdefault("max_grad_norm", 0.2)
    kw.setdefault("expected_batch_size", 6)
    return DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.1), **kw)


# ---------------------------------------------------------------- the optimizer alone
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_optimizer_treats_grad_as_clipped_sum(loss_reduction):
    model, ref = small_model(), small_model()
    x, y = batch(6)
    opt = _fgc(model, loss_reduction=loss_reduction)
    for p, s in zip(model.parameters(), _oracle_clipped_sums(model, x, y, 0.2)):
        p.grad = s.clone()
    opt.record_clipped_backward()  # stands in for the double backward
    assert opt.accumulated_iterations == 1
    opt.step()
    reference_dp_step(ref, x, y, 6, loss_reduction)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)


def test_optimizer_virtual_steps_and_noise_once():
    x, y = batch(6)
    model, union = small_model(), small_model()
    opt = _fgc(model, noise_multiplier=1.0, generator=torch.Generator().manual_seed(2))
    for k, sl in enumerate([slice(0, 2), slice(2, 6)]):
        if k == 0:
            opt.signal_skip_step(True)
        for p, s in zip(model.parameters(), _oracle_clipped_sums(model, x[sl], y[sl], 0.2)):
            p.grad = s.clone()
        opt.record_clipped_backward()  # stands in for the double backward
        opt.step()
        opt.zero_grad()
    opt_u = _fgc(union, noise_multiplier=1.0, generator=torch.Generator().manual_seed(2))
    for p, s in zip(union.parameters(), _oracle_clipped_sums(union, x, y, 0.2)):
        p.grad = s.clone()
    opt_u.record_clipped_backward()  # stands in for the double backward
    opt_u.step()
    for p, q in zip(model.parameters(), union.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)


def test_optimizer_noise_std():
    p = nn.Parameter(torch.zeros(50000))
    p.grad = torch.zeros(50000)
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD([p], lr=1.0),
        noise_multiplier=1.5,
        max_grad_norm=2.0,
        expected_batch_size=10,
        generator=torch.Generator().manual_seed(0),
    )
    opt.record_clipped_backward()
    assert opt.pre_step()
    assert abs(p.grad.std().item() / (1.5 * 2.0 / 10) - 1) < 0.03


def test_optimizer_error_without_grad():
    model = small_model()
    opt = _fgc(model)
    with pytest.raises(ValueError, match="parameter 0 .*DPLossFastGradientClipping"):
        opt.step()


# ---------------------------------------------------------------- double backward (stub module)
class GhostStub(nn.Module, ClippedSumHooks):
    """Implements contract 3's interface (``ClippedSumHooks``) with oracle norms: isolates
    double_backward's logic."""

    def __init__(self, model, x, y, loss_reduction="mean"):
        super().__init__()
        self._module = model
        self.x, self.y = x, y
        self.loss_reduction = loss_reduction
        self.max_grad_norm = 123.0
        self.hooks_enabled = True
        self.events = []

    def forward(self, x):
        return self._module(x)

    def enable_hooks(self):
        self.hooks_enabled = True
        self.events.append("on")

    def disable_hooks(self):
        self.hooks_enabled = False
        self.events.append("off")

    def get_clipping_coef(self):
        self.events.append(("coef", self.max_grad_norm))
        return _oracle_coefs(copy.deepcopy(self._module), self.x, self.y, self.max_grad_norm)


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_double_backward_leaves_clipped_sum_in_grad(loss_reduction):
    model = small_model()
    x, y = batch(5)
    stub = GhostStub(model, x, y, loss_reduction)
    opt = _fgc(model, max_grad_norm=0.3, loss_reduction=loss_reduction)
    criterion = DPLossFastGradientClipping(stub, opt, nn.CrossEntropyLoss(), loss_reduction)
    loss = criterion(stub(x), y)
    assert isinstance(loss, DPTensorFastGradientClipping)
    loss.backward()
    # the optimizer's bound (what schedulers change) is the one used, hooks end enabled
    assert ("coef", 0.3) in stub.events and stub.events[-2:] == ["off", "on"]
    for p, s in zip(model.parameters(), _oracle_clipped_sums(small_model(), x, y, 0.3)):
        torch.testing.assert_close(p.grad, s)  # no unclipped gradient from the first pass


def test_loss_value_item_detach_str():
    model = small_model()
    x, y = batch(5)
    for reduction in ("mean", "sum"):
        stub = GhostStub(model, x, y, reduction)
        crit = DPLossFastGradientClipping(
            stub, _fgc(model, loss_reduction=reduction), nn.CrossEntropyLoss(), reduction
        )
        loss = crit(stub(x), y)
        expected = F.cross_entropy(model(x), y, reduction=reduction)
        assert loss.item() == pytest.approx(expected.item())
        assert not loss.detach().requires_grad
        assert "DPTensorFastGradientClipping" in str(loss)


def test_per_sample_loss_reduces_tokens():
    per_token = torch.arange(12.0).reshape(3, 4)
    torch.testing.assert_close(per_sample_loss(per_token, "mean"), per_token.mean(1))
    torch.testing.assert_close(per_sample_loss(per_token, "sum"), per_token.sum(1))
    torch.testing.assert_close(
        per_sample_loss(per_token.reshape(-1), "mean", shape=(3, 4)), per_token.mean(1)
    )
    with pytest.raises(ValueError, match="one loss per sample"):
        per_sample_loss(torch.tensor(1.0), "mean")
    with pytest.raises(ValueError, match="shape"):
        per_sample_loss(torch.ones(7), "mean", shape=(3, 4))


def test_wrapper_errors():
    model = small_model()
    x, y = batch(3)
    stub = GhostStub(model, x, y, "sum")
    # The tensor only stores its arguments (Opacus 1.6); backward() checks the reductions.
    loss = DPTensorFastGradientClipping(stub, _fgc(model), torch.ones(3), "mean")
    with pytest.raises(ValueError, match="loss_reduction='mean' differs"):
        loss.backward()
    with pytest.raises(ValueError, match="loss_reduction"):
        DPTensorFastGradientClipping(stub, _fgc(model), torch.ones(3), "avg").backward()
    with pytest.raises(ValueError, match="loss_reduction"):
        DPLossFastGradientClipping(stub, _fgc(model), nn.CrossEntropyLoss(), "avg")
    with pytest.raises(ValueError, match="differs from the module's"):
        DPLossFastGradientClipping(stub, _fgc(model), nn.CrossEntropyLoss(), "mean")
    with pytest.raises(TypeError, match="ghost"):
        double_backward(model, _fgc(model), torch.ones(3, requires_grad=True))


# ---------------------------------------------------------------- with the real ghost module
def _gsm_fgc():
    return pytest.importorskip(
        "opacus.grad_sample.grad_sample_module_fast_gradient_clipping"
    ).GradSampleModuleFastGradientClipping


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_end_to_end_with_ghost_module(loss_reduction):
    gsm_cls = _gsm_fgc()
    model, ref = small_model(), small_model()
    x, y = batch(6)
    gsm = gsm_cls(model, loss_reduction=loss_reduction, max_grad_norm=5.0)
    opt = _fgc(gsm, max_grad_norm=0.2, loss_reduction=loss_reduction)
    crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), loss_reduction)
    for step in range(2):
        xb, yb = batch(6, seed=step)
        opt.zero_grad()
        crit(gsm(xb), yb).backward()
        opt.step()
        reference_dp_step(ref, xb, yb, 6, loss_reduction)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)


def test_per_token_losses_with_ghost_module():
    gsm_cls = _gsm_fgc()
    torch.manual_seed(0)
    model = nn.Linear(4, 5).double()
    ref = copy.deepcopy(model)
    b, t = 3, 7
    x = torch.randn(b, t, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (b, t))
    gsm = gsm_cls(model, max_grad_norm=1.0)
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        expected_batch_size=b,
    )
    crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss())
    crit(gsm(x).reshape(b * t, 5), y.reshape(-1), shape=(b, t)).backward()
    opt.step()

    def sample_loss(out, target):  # sample i's own loss: mean over its tokens
        return F.cross_entropy(out.reshape(-1, 5), target.reshape(-1))

    from tests.oracle import brute_force_grad_samples

    gs = brute_force_grad_samples(ref, x, loss_fn=sample_loss, targets=y)
    sums = clipped_sum_flat([gs["weight"], gs["bias"]], 0.1)
    for p, q, s in zip(model.parameters(), ref.parameters(), sums):
        torch.testing.assert_close(p, q - s / b, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------- FSDP (2 CPU processes, gloo)
def _fsdp_worker(rank, world_size, init_file):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    init_gloo(rank, world_size, init_file)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        x, y = batch(8, seed=4)
        shard = slice(rank * 4, rank * 4 + 4)
        for loss_reduction in ("mean", "sum"):
            model = small_model()
            coefs = _oracle_coefs(model, x[shard], y[shard], 0.2)
            fully_shard(model, mesh=mesh)
            opt = FSDPOptimizerFastGradientClipping(
                torch.optim.SGD(model.parameters(), lr=0.1),
                noise_multiplier=0.0,
                max_grad_norm=0.2,
                expected_batch_size=4,
                loss_reduction=loss_reduction,
            )
            assert opt.world_size == world_size
            # what the ghost double backward produces on this rank: FSDP then averages it
            losses = F.cross_entropy(model(x[shard]), y[shard], reduction="none")
            (coefs * losses).sum().backward()
            opt.record_clipped_backward()
            opt.step()
            full = [p.full_tensor() for p in model.parameters()]
            ref = small_model()
            reference_dp_step(ref, x, y, 8, loss_reduction)
            for p, q in zip(full, ref.parameters()):
                torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)
        # noise: each rank noises its own shard once, std sigma * C / (B_local * W)
        torch.manual_seed(0)
        big = nn.Linear(200, 100, bias=False)
        fully_shard(big, mesh=mesh)
        opt = FSDPOptimizerFastGradientClipping(
            torch.optim.SGD(big.parameters(), lr=1.0),
            noise_multiplier=2.0,
            max_grad_norm=0.5,
            expected_batch_size=4,
            generator=torch.Generator().manual_seed(rank),
        )
        (big(torch.zeros(4, 200)) * 0).sum().backward()
        opt.record_clipped_backward()
        opt.pre_step()
        full = big.weight.grad.full_tensor()
        assert abs(full.std().item() / (2.0 * 0.5 / 8) - 1) < 0.05
        # leave together: gloo can abort a rank whose peer tears down first
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp_optimizer_two_processes():
    pytest.importorskip("torch.distributed.fsdp")
    run_distributed(_fsdp_worker, 2)


def _ddp_fgc_worker(rank, world_size, init_file):
    import torch.distributed as dist

    from opacus.optimizers import DistributedDPOptimizerFastGradientClipping

    init_gloo(rank, world_size, init_file)
    try:
        x, y = batch(8, seed=4)
        shard = slice(rank * 4, rank * 4 + 4)
        for loss_reduction in ("mean", "sum"):
            kw = dict(noise_multiplier=1.0, max_grad_norm=0.2, loss_reduction=loss_reduction)
            model, ref = small_model(), small_model()
            opt = DistributedDPOptimizerFastGradientClipping(
                torch.optim.SGD(model.parameters(), lr=0.1),
                expected_batch_size=4,
                generator=torch.Generator().manual_seed(1),
                **kw
            )
            for p, s in zip(
                model.parameters(), _oracle_clipped_sums(model, x[shard], y[shard], 0.2)
            ):
                p.grad = s.clone()
            opt.record_clipped_backward()  # stands in for the double backward
            opt.step()
            ref_opt = DPOptimizer(
                torch.optim.SGD(ref.parameters(), lr=0.1),
                expected_batch_size=8,
                generator=torch.Generator().manual_seed(1),
                **kw
            )
            set_grad_samples(ref, x, y)
            ref_opt.step()
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)
        # leave together: gloo can abort a rank whose peer tears down first
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_fgc_optimizer_two_processes():
    run_distributed(_ddp_fgc_worker, 2)


def test_fsdp_optimizer_without_process_group_is_the_plain_one():
    model, ref = small_model(), small_model()
    x, y = batch(6)
    opt = FSDPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=0.2,
        expected_batch_size=6,
    )
    assert opt.world_size == 1
    for p, s in zip(model.parameters(), _oracle_clipped_sums(model, x, y, 0.2)):
        p.grad = s.clone()
    opt.record_clipped_backward()  # stands in for the double backward
    opt.step()
    grads = dp_grads(ref, x, y, max_grad_norm=0.2, expected_batch_size=6)
    for p, q, g in zip(model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p, q - 0.1 * g, atol=1e-10, rtol=1e-8)
    assert math.isfinite(opt.max_grad_norm)


# ---------------------------------------------------------------- plain backward is refused
def _ghost_setup(loss_reduction="mean", clip=0.2, **kw):
    gsm = _gsm_fgc()(small_model(), loss_reduction=loss_reduction, max_grad_norm=clip)
    opt = _fgc(gsm, max_grad_norm=clip, loss_reduction=loss_reduction, **kw)
    crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), loss_reduction)
    return gsm, opt, crit


def test_plain_backward_is_refused():
    # The unclipped gradient of this batch has norm far above the bound: were p.grad trusted,
    # the update would be unclipped while the noise is calibrated to max_grad_norm.
    gsm, opt, _ = _ghost_setup(clip=1e-3, noise_multiplier=1.0)
    before = [p.detach().clone() for p in gsm.parameters()]
    x, y = batch(6)
    F.cross_entropy(gsm(x), y).backward()
    with pytest.raises(RuntimeError, match="no clipped backward.*DPLossFastGradientClipping"):
        opt.step()
    for p0, p in zip(before, gsm.parameters()):
        assert torch.equal(p0, p.detach())


def test_plain_backward_after_a_dp_step_is_refused():
    gsm, opt, crit = _ghost_setup()
    x, y = batch(6)
    crit(gsm(x), y).backward()
    opt.step()
    opt.zero_grad()  # grads are zero tensors now (set_to_none=False)
    F.cross_entropy(gsm(x), y).backward()
    with pytest.raises(RuntimeError, match="UNCLIPPED"):
        opt.step()
    # a stale record does not survive zero_grad either
    crit(gsm(x), y).backward()
    opt.zero_grad()
    F.cross_entropy(gsm(x), y).backward()
    with pytest.raises(RuntimeError, match="UNCLIPPED"):
        opt.step()


def test_plain_backward_in_a_virtual_step_is_refused():
    gsm, opt, crit = _ghost_setup()
    x, y = batch(6)
    opt.signal_skip_step(True)
    crit(gsm(x[:3]), y[:3]).backward()
    assert opt.step() is None
    opt.zero_grad()
    F.cross_entropy(gsm(x[3:]), y[3:]).backward()
    with pytest.raises(RuntimeError, match="DPLossFastGradientClipping"):
        opt.step()


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_virtual_steps_with_ghost_module_equal_one_brute_force_step(loss_reduction):
    gsm, opt, crit = _ghost_setup(loss_reduction)
    ref = small_model()
    x, y = batch(6)
    for k, sl in enumerate([slice(0, 2), slice(2, 2), slice(2, 6)]):  # the middle one is empty
        if k < 2:
            opt.signal_skip_step(True)
        crit(gsm(x[sl]), y[sl]).backward()
        opt.step()
        opt.zero_grad()
    grads = dp_grads(
        ref,
        x,
        y,
        max_grad_norm=0.2,
        expected_batch_size=6 if loss_reduction == "mean" else None,
        loss_reduction=loss_reduction,
    )
    for p, q, g in zip(gsm.parameters(), small_model().parameters(), grads):
        torch.testing.assert_close(p.detach(), q - 0.1 * g, atol=1e-10, rtol=1e-8)


def test_fsdp_optimizer_refuses_plain_backward():
    model = small_model()
    opt = FSDPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=0.2,
        expected_batch_size=6,
    )
    x, y = batch(6)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="DPLossFastGradientClipping"):
        opt.step()

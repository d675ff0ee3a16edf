"""torch DistributedDataParallel + BatchMemoryManager + Poisson sampling, on 2 gloo ranks.

Issue 16 item 5: ranks split Poisson batches of different sizes into different numbers of physical
batches. If DDP all-reduced the raw gradient of every backward pass, those collectives would pair
with another rank's optimizer all-reduce and raw (unclipped) gradients would enter the update.
Oracle: one process, brute-force per-sample gradients (tests.oracle) of the union of both ranks'
logical batches, clipped sample by sample, summed, divided by the global expected batch size.
"""

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.utils.batch_memory_manager import BatchMemoryManager
from tests.optimizers.dp_reference import run_distributed
from tests.oracle import brute_force_grad_samples

N, BATCH, CLIP, LR = 24, 12, 0.05, 0.5


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=g)
    return x, torch.randint(0, 3, (N,), generator=g), torch.arange(N)


def _loss(out, y):
    return nn.functional.cross_entropy(out, y)


def _init(rank, world_size, init_file):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),  # a collective mismatch must not hang CI
    )


def _ddp_bmm_run(rank, out, grad_sample_mode):
    x, y, idx = _data()
    ddp = DDP(_model())
    engine = PrivacyEngine(accountant="rdp")
    made = engine.make_private(
        module=ddp,
        optimizer=torch.optim.SGD(ddp.parameters(), lr=LR),
        data_loader=DataLoader(
            TensorDataset(x, y, idx),
            batch_size=BATCH,
            generator=torch.Generator().manual_seed(5 + rank),
        ),
        noise_multiplier=0.0,
        max_grad_norm=CLIP,
        grad_sample_mode=grad_sample_mode,
    )
    if len(made) == 4:  # ghost clipping: the DP criterion runs the clipped second pass
        model, opt, criterion, dl = made
    else:
        (model, opt, dl), criterion = made, _loss
    out["sync"] = ddp.require_backward_grad_sync
    out["optimizer"] = type(opt).__name__
    out["expected_batch_size"] = opt.expected_batch_size
    physical, real_after = [], []
    accountant_hook = opt.step_hook

    def hook(o):
        real_after.append(len(physical))
        accountant_hook(o)

    opt.attach_step_hook(hook)
    with BatchMemoryManager(data_loader=dl, max_physical_batch_size=1, optimizer=opt) as pdl:
        for xb, yb, ib in pdl:
            physical.append(ib.tolist())
            opt.zero_grad()
            criterion(model(xb), yb).backward()
            opt.step()
    # logical batches: the physical ones between two real steps
    logical, start = [], 0
    for end in real_after:
        logical.append([i for b in physical[start:end] for i in b])
        start = end
    out["logical"] = logical
    out["backward_passes"] = [end - s for s, end in zip([0] + real_after[:-1], real_after)]
    out["params"] = [p.detach().clone() for p in ddp.module.parameters()]
    out["history"] = list(engine.accountant.history)


def _per_layer_refusal(rank, out):
    x, y, idx = _data()
    ddp = DDP(_model())
    _, opt, dl = PrivacyEngine(accountant="rdp").make_private(
        module=ddp,
        optimizer=torch.optim.SGD(ddp.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=0.0,
        max_grad_norm=[CLIP] * 4,
        clipping="per_layer",
    )
    out["per_layer_optimizer"] = type(opt).__name__
    out["per_layer_sync"] = ddp.require_backward_grad_sync
    try:
        BatchMemoryManager(data_loader=dl, max_physical_batch_size=1, optimizer=opt)
    except ValueError as e:
        out["per_layer_refusal"] = str(e)


def _dpddp_per_layer(rank, out):
    # DPDDP has no gradient hooks: the per-layer optimizer must all-reduce (and noise once).
    x, y, _ = _data()
    model = _model()
    wrapped = DPDDP(model)
    gsm, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=wrapped,
        optimizer=torch.optim.SGD(wrapped.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=1.0,
        max_grad_norm=[CLIP] * 4,
        clipping="per_layer",
        noise_generator=torch.Generator().manual_seed(11 + rank),
    )
    out["dpddp_per_layer_optimizer"] = type(opt).__name__
    shard = slice(rank * 6, rank * 6 + 6)
    opt.zero_grad()
    _loss(gsm(x[shard]), y[shard]).backward()
    opt.step()
    out["dpddp_per_layer_params"] = [p.detach().clone() for p in model.parameters()]


def _worker(rank, world_size, init_file, out_dir):
    _init(rank, world_size, init_file)
    try:
        out = {}
        for mode in ("hooks", "ghost"):
            out[mode] = {}
            _ddp_bmm_run(rank, out[mode], mode)
        _per_layer_refusal(rank, out)
        _dpddp_per_layer(rank, out)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: gloo can abort a rank whose peer tears down first
    finally:
        dist.destroy_process_group()


def _oracle(logical_steps):
    """Parameters after one-process DP-SGD (noise 0) on the union of the ranks' batches."""
    model = _model()
    x, y, _ = _data()
    for batch in logical_steps:
        if batch:
            gs = brute_force_grad_samples(model, x[batch], loss_fn=_loss, targets=y[batch])
            names = [n for n, _ in model.named_parameters()]
            flat = torch.cat([gs[n].flatten(1) for n in names], dim=1)
            factor = (CLIP / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
            # each sample's clipped contribution has norm <= CLIP by construction
            assert (flat.norm(dim=1) * factor <= CLIP + 1e-6).all()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p -= LR * torch.einsum("b,b...->...", factor, gs[n]) / BATCH
    return [p.detach() for p in model.parameters()]


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as tmp:
        run_distributed(_worker, 2, tmp)
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, optimizer",
    [("hooks", "DistributedDPOptimizer"), ("ghost", "DistributedDPOptimizerFastGradientClipping")],
)
def test_ddp_bmm_poisson_update_is_the_clipped_sum_of_the_union(results, mode, optimizer):
    r0, r1 = (r[mode] for r in results)
    for r in (r0, r1):
        assert r["optimizer"] == optimizer
        assert r["sync"] is False  # DDP never all-reduces raw gradients
        assert r["expected_batch_size"] == BATCH // 2
    # every rank takes the same number of optimizer steps ...
    assert len(r0["logical"]) == len(r1["logical"]) == int(1 / (BATCH / N))
    # ... but the scenario is real: ranks ran different numbers of backward passes
    assert r0["backward_passes"] != r1["backward_passes"]
    union = [a + b for a, b in zip(r0["logical"], r1["logical"])]
    assert all(len(set(u)) == len(u) for u in union)  # the ranks' shards are disjoint
    expected = _oracle(union)
    for r in (r0, r1):
        for got, want in zip(r["params"], expected):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert r["history"] == [(0.0, BATCH / N, len(union))]


@pytest.mark.slow
def test_ddp_per_layer_hook_optimizer_refuses_bmm_with_poisson(results):
    for r in results:
        assert r["per_layer_optimizer"] == "DistributedPerLayerOptimizer"
        assert r["per_layer_sync"] is True  # its private gradients go through DDP's all-reduce
        assert "DistributedPerLayerOptimizer" in r["per_layer_refusal"]
        assert "clipping='flat'" in r["per_layer_refusal"]


@pytest.mark.slow
def test_dpddp_per_layer_all_reduces_noise_once(results):
    r0, r1 = results
    assert r0["dpddp_per_layer_optimizer"] == "SimpleDistributedPerLayerOptimizer"
    # Replicas stay identical: rank 1 steps on the same noisy all-reduced gradient as rank 0
    # (with the hook optimizer and no DDP it stepped on its own un-noised sum).
    for a, b in zip(r0["dpddp_per_layer_params"], r1["dpddp_per_layer_params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

"""Two-process DP training (gloo on localhost) against a one-process brute-force oracle."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.distributed import average_gradients
from tests.optimizers.dp_reference import START_METHOD
from tests.oracle import brute_force_grad_samples

WORLD_SIZE = 2
N, BATCH, CLIP, LR = 16, 8, 0.3, 0.5
NOISE_DIM, NOISE_LR = 64, 1.0


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)


def _rank_indices(rank):
    # A fixed split of one logical batch of 8 samples between the two ranks (uneven on purpose).
    return [[0, 3, 5], [1, 2, 6, 7, 9]][rank]


def _worker(rank, init_file, out_dir):
    # A forked child must not enter the parent's OpenMP pool (libgomp is not fork-safe).
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        out = {}
        model = _model()
        if rank == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)  # the wrapper must overwrite this with rank 0's values
        ddp = DPDDP(model)
        out["initial"] = [p.detach().clone() for p in ddp.parameters()]
        x, y = _data()
        engine = PrivacyEngine(accountant="rdp")
        gsm, opt, dl = engine.make_private(
            module=ddp,
            optimizer=torch.optim.SGD(ddp.parameters(), lr=LR),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
            noise_multiplier=0.0,
            max_grad_norm=CLIP,
        )
        out["optimizer"] = type(opt).__name__
        out["batch_gradients"] = gsm.compute_batch_gradients
        out["sampler"] = type(dl.batch_sampler).__name__
        out["shard"] = dl.batch_sampler.num_samples
        out["expected_batch_size"] = opt.expected_batch_size
        idx = _rank_indices(rank)
        opt.zero_grad()
        nn.functional.cross_entropy(gsm(x[idx]), y[idx]).backward()
        opt.step()
        out["updated"] = [p.detach().clone() for p in model.parameters()]
        out["history"] = list(engine.accountant.history)

        # Noise: zero inputs give zero per-sample gradients, so the update is the noise alone.
        lin = nn.Linear(NOISE_DIM, NOISE_DIM, bias=False)
        nn.init.zeros_(lin.weight)
        noisy_ddp = DPDDP(lin)
        engine2 = PrivacyEngine(accountant="rdp")
        gsm2, opt2, _ = engine2.make_private(
            module=noisy_ddp,
            optimizer=torch.optim.SGD(noisy_ddp.parameters(), lr=NOISE_LR),
            data_loader=DataLoader(TensorDataset(torch.zeros(N, NOISE_DIM)), batch_size=BATCH),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            noise_generator=torch.Generator().manual_seed(100 + rank),
        )
        gsm2(torch.zeros(4, NOISE_DIM)).sum().backward()
        opt2.step()
        out["noise_update"] = lin.weight.detach().clone()
        out["noise_ebs"] = opt2.expected_batch_size

        # average_gradients: mean of the ranks' gradients.
        avg = nn.Linear(2, 1)
        avg.weight.grad = torch.full_like(avg.weight, float(rank + 1))
        average_gradients(avg)
        out["average"] = avg.weight.grad.clone()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        # leave together: gloo can abort a rank whose peer tears down first
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_two_processes():
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # pay torch's lazy imports once
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        # fork: the children inherit the imported torch/opacus (spawn re-imports: ~10 s more).
        mp.start_processes(
            _worker, args=(init_file, tmp), nprocs=WORLD_SIZE, join=True, start_method=START_METHOD
        )
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


def _oracle_update():
    model = _model()
    x, y = _data()
    idx = _rank_indices(0) + _rank_indices(1)

    def loss(out, target):
        return nn.functional.cross_entropy(out, target)

    gs = brute_force_grad_samples(model, x[idx], loss_fn=loss, targets=y[idx])
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([gs[n].flatten(1) for n in names], dim=1)
    factor = (CLIP / flat.norm(dim=1)).clamp(max=1.0)
    # expected batch size of the global logical batch: N * (1 / len(loader)) = BATCH
    return [
        p.detach() - LR * torch.einsum("b,b...->...", factor, gs[n]) / BATCH
        for n, p in model.named_parameters()
    ]


def _check_setup_is_distributed(results):
    for r in results:
        assert r["optimizer"] == "DistributedDPOptimizer"
        # Data parallelism keeps p.grad: its all-reduce (and per-layer hooks) run on it.
        assert r["batch_gradients"] is True
        assert r["sampler"] == "DistributedUniformWithReplacementSampler"
        assert r["expected_batch_size"] == BATCH // WORLD_SIZE
    assert results[0]["shard"] + results[1]["shard"] == N


def _check_parameters_broadcast_from_rank0(results):
    for a, b in zip(results[0]["initial"], results[1]["initial"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(results[0]["initial"], _model().parameters()):
        torch.testing.assert_close(a, b.detach())


def _check_two_processes_equal_one_process_on_union(results):
    expected = _oracle_update()
    for r in results:
        for got, want in zip(r["updated"], expected):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert r["history"] == [(0.0, 1 / 2, 1)]


def _check_noise_added_once(results):
    u0, u1 = results[0]["noise_update"], results[1]["noise_update"]
    torch.testing.assert_close(u0, u1, rtol=0, atol=0)  # replicas stay identical
    ebs_total = results[0]["noise_ebs"] * WORLD_SIZE
    expected_var = (NOISE_LR * 1.0 * 1.0 / ebs_total) ** 2
    var = u0.var().item()
    # 4096 coordinates: the sample variance is within ~2.2% (1 s.d.); twice the noise -> 2x.
    assert abs(var / expected_var - 1) < 0.15, (var, expected_var)


def _check_average_gradients(results):
    for r in results:
        torch.testing.assert_close(r["average"], torch.full((1, 2), 1.5))


@pytest.mark.slow
def test_two_process_training():
    # One test (not one per check) so that under pytest-xdist a single worker starts the group.
    results = _run_two_processes()
    _check_setup_is_distributed(results)
    _check_parameters_broadcast_from_rank0(results)
    _check_two_processes_equal_one_process_on_union(results)
    _check_noise_added_once(results)
    _check_average_gradients(results)


def test_without_process_group_wrapper_is_transparent():
    if dist.is_initialized():
        pytest.skip("a process group is initialised here")
    model = nn.Linear(3, 2)
    wrapped = DPDDP(model)
    x = torch.randn(4, 3)
    torch.testing.assert_close(wrapped(x), model(x))
    model.weight.grad = torch.ones_like(model.weight)
    average_gradients(model)  # no-op without a process group
    torch.testing.assert_close(model.weight.grad, torch.ones_like(model.weight))

"""Banded MF under two-process data parallelism (gloo on localhost): rank 0 draws the correlated
noise, the replicas stay identical, the update is rank 0's stream (replayed independently with a
dense C^{-1}), and the cyclic groups are split over the ranks."""

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
from opacus.utils.uniform_sampler import CyclicPoissonSampler
from tests.optimizers.dp_reference import START_METHOD
from tests.test_correlated_noise import dense_c

WORLD_SIZE, N, BATCH, DIM, BANDS, STEPS, LR = 2, 32, 8, 16, 2, 3, 1.0


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        lin = nn.Linear(DIM, DIM, bias=False)
        nn.init.zeros_(lin.weight)
        ddp = DPDDP(lin)
        engine = PrivacyEngine(accountant="rdp")
        gsm, opt, dl = engine.make_private(
            module=ddp,
            optimizer=torch.optim.SGD(ddp.parameters(), lr=LR),
            data_loader=DataLoader(TensorDataset(torch.zeros(N, DIM)), batch_size=BATCH),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            noise_generator=torch.Generator().manual_seed(100 + rank),
            noise_mechanism="banded_mf",
            bands=BANDS,
        )
        out = {"optimizer": type(opt).__name__, "ebs": opt.expected_batch_size}
        out["groups"] = [g.clone() for g in dl.batch_sampler.groups]
        out["coefficients"] = opt.noise_mechanism.coefficients
        updates = []
        for _ in range(STEPS):
            opt.zero_grad()
            gsm(torch.zeros(3, DIM)).sum().backward()  # zero per-sample gradients
            opt.step()
            updates.append(lin.weight.detach().clone())
        out["updates"] = updates
        out["history"] = list(engine.accountant.history)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_banded_mf():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        mp.start_processes(
            _worker, args=(init_file, tmp), nprocs=WORLD_SIZE, join=True, start_method=START_METHOD
        )
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD_SIZE)]

    r0, r1 = results
    assert r0["optimizer"] == "DistributedDPOptimizer"
    for a, b in zip(r0["updates"], r1["updates"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # replicas agree
    # each rank holds its share of every group; together they are the one-process groups
    single = CyclicPoissonSampler(num_samples=N, sample_rate=0.5, bands=BANDS).groups
    for g, (a, b) in enumerate(zip(r0["groups"], r1["groups"])):
        assert sorted(torch.cat([a, b]).tolist()) == sorted(single[g].tolist())
    # the update is -lr * prefix sum of rank 0's stream / global expected batch size
    coeffs = r0["coefficients"]
    col = sum(c * c for c in coeffs) ** 0.5
    g = torch.Generator().manual_seed(100)
    z = [torch.normal(0.0, col, size=(DIM, DIM), generator=g).double() for _ in range(STEPS)]
    cinv = torch.linalg.inv(dense_c(coeffs, STEPS))
    ebs = r0["ebs"] * WORLD_SIZE
    assert ebs == BATCH
    total = torch.zeros(DIM, DIM, dtype=torch.float64)
    for t in range(STEPS):
        total -= LR * sum(cinv[t, s] * z[s] for s in range(t + 1)) / ebs
        torch.testing.assert_close(r0["updates"][t].double(), total, atol=1e-5, rtol=1e-5)
    # the accountant: ceil(3 / 2) = 2 reduced DP-SGD steps at the per-group rate
    assert r0["history"] == [(1.0, BANDS * BATCH / N, 2)]

#!/usr/bin/env python
"""Data-parallel DP-SGD on the digits: two (or more) processes, one logical batch.

Each process Poisson-samples its share of the data; ``DistributedDPOptimizer`` clips every
sample's gradient locally, all-reduces the clipped sums, and adds the noise once (on rank 0), so
the update and the privacy guarantee are those of one process training on the union. Run it with

    torchrun --nproc_per_node=2 examples/distributed.py        # the usual launcher
    python examples/distributed.py --spawn --world-size 2      # torch.multiprocessing, no torchrun

CPU only (the ``gloo`` backend). Rank 0 prints the progress and the final ``RESULT:`` line.
"""

import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402 (the examples' shared helpers, next to this script)
from digits import load_digits_tensors, make_model  # noqa: E402 (sibling example)


def parse_args(argv=None):
    p = common.make_parser(__doc__)
    p.add_argument(
        "--spawn",
        action="store_true",
        help="start the processes here with torch.multiprocessing instead of torchrun",
    )
    p.add_argument("--world-size", type=int, default=2, help="processes to start with --spawn")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="expected LOGICAL batch size, summed over all processes",
    )
    p.add_argument("--lr", type=float, default=0.5)
    common.add_privacy_args(p, sigma=1.0)
    common.add_run_args(p, threads_help="torch threads per process")
    return p.parse_args(argv)


def train(rank, world_size, args):
    from opacus import PrivacyEngine
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    common.set_threads(args)
    # Same seed everywhere: identical data split; DPDDP broadcasts rank 0's weights anyway.
    torch.manual_seed(args.seed)
    train_set, test_set = load_digits_tensors(args.seed)
    model = DPDDP(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    privacy_engine = PrivacyEngine(accountant="prv")
    # make_private sees the process group and DPDDP: a distributed Poisson sampler (each rank its
    # shard) and DistributedDPOptimizer.
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(train_set, batch_size=args.batch_size),
        noise_multiplier=args.sigma,
        max_grad_norm=args.max_grad_norm,
    )
    torch.manual_seed(args.seed + 1 + rank)  # independent Poisson draws per rank
    criterion = nn.CrossEntropyLoss()
    lead = rank == 0
    if lead:
        print(
            f"{world_size} processes, {type(optimizer).__name__}, expected batch "
            f"{optimizer.expected_batch_size} per process"
        )
    start, steps, eps = time.time(), 0, float("nan")
    show_bar = lead and common.bars_enabled(args)
    for epoch in range(1, args.epochs + 1):
        bar = common.progress(train_loader, f"epoch {epoch}/{args.epochs}", show_bar)
        for x, y in bar:
            # an empty Poisson batch still takes part in the all-reduce (with a zero loss)
            out, loss = common.sgd_step(model, optimizer, criterion, x, y)
            steps += 1
            if show_bar:
                common.show_batch(bar, loss, out, y, lambda: privacy_engine.get_epsilon(args.delta))
            if common.out_of_steps(steps, args.max_steps):
                break
        eps = privacy_engine.get_epsilon(args.delta)
        if lead:
            test_acc = common.evaluate(model, DataLoader(test_set, 256))
            print(f"epoch {epoch:3d} | test acc {test_acc:.3f} | eps {eps:.2f}")
        if common.out_of_steps(steps, args.max_steps):
            break

    # The replicas must still be equal: all ranks applied the same all-reduced, noised update.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    in_sync = all(torch.equal(gathered[0], g) for g in gathered[1:])
    if lead:
        test_acc = common.evaluate(model, DataLoader(test_set, batch_size=256))
        print(
            f"RESULT: test accuracy {test_acc:.3f} at eps {eps:.2f}, delta {args.delta}, "
            f"{world_size} processes, {steps} steps in {time.time() - start:.1f}s, "
            f"replicas in sync: {in_sync}"
        )
    # Tear down together: a rank that destroys its process group while a peer still uses the
    # connection can abort in gloo's threads.
    dist.barrier()
    return in_sync


def _spawned(rank, world_size, init_file, args):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        train(rank, world_size, args)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    if args.spawn:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            # a file rendezvous: no port to pick, nothing left behind
            mp.spawn(
                _spawned,
                args=(args.world_size, os.path.join(tmp, "rendezvous"), args),
                nprocs=args.world_size,
                join=True,
            )
        return
    if "RANK" not in os.environ:
        raise SystemExit(
            "not started by torchrun: run `torchrun --nproc_per_node=2 "
            "examples/distributed.py`, or pass --spawn"
        )
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    try:
        train(dist.get_rank(), dist.get_world_size(), args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

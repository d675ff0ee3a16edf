"""Peak memory of one DP-SGD logical step, with and without BatchMemoryManager (CPU).

Per-sample gradients take ``batch * n_params`` floats, so splitting a logical batch into physical
batches of 1/k of its size should cut the peak tensor memory of a step by about k (the model,
optimizer state and one physical batch remain). Peak memory is measured with the PyTorch profiler
(``profile_memory=True``): the running sum of tensor allocations and frees, in time order.

Usage: python benchmarks/batch_memory.py [--logical 512] [--split 8] [--width 256]
"""

import argparse

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import TensorDataset

from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager


def _peak_bytes(prof) -> int:
    deltas = []
    for e in prof.events():
        # Allocations are charged to the innermost op (self usage); frees are "[memory]" events.
        delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if delta:
            deltas.append((e.time_range.start, delta))
    current = peak = 0
    for _, delta in sorted(deltas):
        current += delta
        peak = max(peak, current)
    return peak


def _run(logical: int, physical: int, width: int, seed: int = 0) -> int:
    torch.manual_seed(seed)
    n = logical * 4
    data = TensorDataset(torch.randn(n, width), torch.randint(0, 10, (n,)))
    model = GradSampleModule(
        nn.Sequential(
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )
    )
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=logical,
    )
    loader = DPDataLoader(
        data, sample_rate=logical / n, generator=torch.Generator().manual_seed(seed)
    )
    criterion = nn.CrossEntropyLoss()
    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer
    ) as physical_loader:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for x, y in physical_loader:
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()
    return _peak_bytes(prof)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logical", type=int, default=512, help="expected logical batch size")
    parser.add_argument("--split", type=int, default=8, help="physical = logical / split")
    parser.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    args = parser.parse_args()
    # Unsplit: the physical limit is far above any Poisson batch (same batches, same seed).
    unsplit = _run(args.logical, args.logical * 4, args.width)
    split = _run(args.logical, args.logical // args.split, args.width)
    print(f"logical batch ~{args.logical}, MLP width {args.width}")
    print(f"peak tensor memory, unsplit:              {unsplit / 2**20:8.1f} MiB")
    print(f"peak tensor memory, physical = 1/{args.split}:      {split / 2**20:8.1f} MiB")
    print(f"ratio split / unsplit: {split / unsplit:.3f}")


if __name__ == "__main__":
    main()

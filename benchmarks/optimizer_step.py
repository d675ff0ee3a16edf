"""Overhead of the DP optimizer's clip + noise step for a small CNN (batch 64).

Times (median of ``--repeats``): the non-private forward + backward, the hooks-mode
GradSampleModule forward + backward (when opacus.grad_sample is importable), and the optimizer
stages given ``p.grad_sample``: flat clip-and-accumulate (one einsum per parameter), the same
done naively (a clipped copy of every per-sample gradient, then a sum), noise (plain and
secure mode), per-layer clipping and the whole ``DPOptimizer.step``.  Prints a Markdown table.

Usage: python benchmarks/optimizer_step.py [--batch-size 64] [--repeats 30] [--device cpu|cuda]
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in milliseconds (after five warm-up calls)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    b = args.batch_size

    model = small_cnn().to(device)
    x = torch.randn(b, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (b,), device=device)
    params = list(model.parameters())
    rows = []

    def plain_backward():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    rows.append(("non-private forward + backward", timed(plain_backward, args.repeats, device)))

    try:
        from opacus.grad_sample import GradSampleModule
    except ImportError:
        GradSampleModule = None
    if GradSampleModule is not None:
        gsm = GradSampleModule(small_cnn().to(device))

        def hooks_backward():
            gsm.zero_grad()
            for p in gsm.parameters():
                p.grad_sample = None
            F.cross_entropy(gsm(x), y).backward()

        hooks_ms = timed(hooks_backward, args.repeats, device)
        rows.append(("GradSampleModule (hooks) forward + backward", hooks_ms))
        # The real flow: the optimizer reads the grad samples (and the norms book-kept by the
        # hooks) of a real backward, as in training; its share of the whole DP step is the target.
        dp = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=0.01),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=b,
        )

        backward_ms, step_ms = [], []
        for i in range(args.repeats + 3):
            dp.zero_grad()
            start = time.perf_counter()
            F.cross_entropy(gsm(x), y).backward()
            _sync(device)
            middle = time.perf_counter()
            dp.step()
            _sync(device)
            end = time.perf_counter()
            if i >= 3:  # warm-up
                backward_ms.append((middle - start) * 1e3)
                step_ms.append((end - middle) * 1e3)
        backward_med, step_med = statistics.median(backward_ms), statistics.median(step_ms)
        rows.append(("training loop: hooks forward + backward", backward_med))
        rows.append(("training loop: DPOptimizer.step on those grad samples", step_med))
        share = step_med / (backward_med + step_med)

    grad_samples = [torch.randn(b, *p.shape, device=device) for p in params]

    def fresh(opt):
        for p, g in zip(params, grad_samples):
            p.grad_sample = g
            p.summed_grad = None

    flat = DPOptimizer(
        torch.optim.SGD(params, lr=0.01),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=b,
    )
    per_layer = DPPerLayerOptimizer(
        torch.optim.SGD(params, lr=0.01),
        noise_multiplier=1.0,
        max_grad_norm=[1.0] * len(params),
        expected_batch_size=b,
    )
    secure = DPOptimizer(
        torch.optim.SGD(params, lr=0.01),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=b,
        secure_mode=True,
    )

    def clip_flat():
        fresh(flat)
        flat.clip_and_accumulate()

    def clip_naive():
        # the non-vectorised alternative: materialise clipped copies, then sum
        norms = torch.stack([g.reshape(b, -1).norm(dim=1) for g in grad_samples]).norm(dim=0)
        factors = (1.0 / (norms + 1e-6)).clamp(max=1.0)
        return [torch.stack([factors[i] * g[i] for i in range(b)]).sum(0) for g in grad_samples]

    def clip_per_layer():
        fresh(per_layer)
        per_layer.clip_and_accumulate()

    def noise(opt):
        def run():
            for p in params:
                p.summed_grad = torch.zeros_like(p)
            opt.add_noise()

        return run

    def full_step():
        fresh(flat)
        flat.step()

    rows += [
        ("flat clip + accumulate (einsum)", timed(clip_flat, args.repeats, device)),
        ("flat clip, naive per-sample loop (reference)", timed(clip_naive, args.repeats, device)),
        ("per-layer clip + accumulate", timed(clip_per_layer, args.repeats, device)),
        ("add_noise", timed(noise(flat), args.repeats, device)),
        ("add_noise, secure_mode", timed(noise(secure), args.repeats, device)),
        ("DPOptimizer.step (clip + noise + scale + SGD)", timed(full_step, args.repeats, device)),
    ]

    n_params = sum(p.numel() for p in params)
    print(
        f"Small CNN, {n_params} parameters, batch {b}, device {device}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| stage | median ms |")
    print("| --- | ---: |")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")
    if GradSampleModule is not None:
        print(
            f"\noptimizer step's share of the hooks-mode DP step: {100 * share:.1f} % "
            "(target < 10 %)"
        )


if __name__ == "__main__":
    main()

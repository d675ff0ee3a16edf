"""Per-layer cost of the per-sample gradient (and norm) samplers.

For each supported layer family: the median time of the layer's plain forward + backward at batch
64, and of its grad sampler (and norm sampler, where registered) given the captured activations and
backprops; the ratio says what per-sample information costs on top of ordinary training.  Prints
a Markdown table.

Usage: python benchmarks/layers.py [--batch-size 64] [--repeats 20] [--device cpu|cuda]
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn

from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.embedding import (
    compute_embedding_grad_sample,
    compute_embedding_norm_sample,
    compute_embeddingbag_gradsampler,
)
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.grad_sample.instance_norm import compute_instance_norm_grad_sample
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from opacus.grad_sample.rms_norm import compute_rms_norm_grad_sample


def cases(batch: int):
    """(name, layer, input shape or index tensor factory, grad sampler, norm sampler or None)."""
    floats = lambda *shape: (lambda: torch.randn(batch, *shape))  # noqa: E731
    ints = lambda high, *shape: (lambda: torch.randint(0, high, (batch, *shape)))  # noqa: E731
    return [
        (
            "Linear 512->512",
            nn.Linear(512, 512),
            floats(512),
            compute_linear_grad_sample,
            compute_linear_norm_sample,
        ),
        (
            "Linear seq T=16, 256->256",
            nn.Linear(256, 256),
            floats(16, 256),
            compute_linear_grad_sample,
            compute_linear_norm_sample,
        ),
        (
            "Linear seq T=256, 64->64",
            nn.Linear(64, 64),
            floats(256, 64),
            compute_linear_grad_sample,
            compute_linear_norm_sample,
        ),
        (
            "Conv1d 16->32 k5",
            nn.Conv1d(16, 32, 5, padding=2),
            floats(16, 128),
            compute_conv_grad_sample,
            None,
        ),
        (
            "Conv2d 16->32 k3",
            nn.Conv2d(16, 32, 3, padding=1),
            floats(16, 32, 32),
            compute_conv_grad_sample,
            None,
        ),
        (
            "Conv3d 4->8 k3",
            nn.Conv3d(4, 8, 3, padding=1),
            floats(4, 8, 16, 16),
            compute_conv_grad_sample,
            None,
        ),
        (
            "Embedding 10000x64, T=32",
            nn.Embedding(10000, 64),
            ints(10000, 32),
            compute_embedding_grad_sample,
            compute_embedding_norm_sample,
        ),
        (
            "EmbeddingBag 10000x64 mean, L=32",
            nn.EmbeddingBag(10000, 64),
            ints(10000, 32),
            compute_embeddingbag_gradsampler,
            None,
        ),
        (
            "LayerNorm 512, T=16",
            nn.LayerNorm(512),
            floats(16, 512),
            compute_layer_norm_grad_sample,
            None,
        ),
        ("RMSNorm 512, T=16", nn.RMSNorm(512), floats(16, 512), compute_rms_norm_grad_sample, None),
        (
            "GroupNorm 8x32, 16x16",
            nn.GroupNorm(8, 32),
            floats(32, 16, 16),
            compute_group_norm_grad_sample,
            None,
        ),
        (
            "InstanceNorm2d 32, 16x16",
            nn.InstanceNorm2d(32, affine=True),
            floats(32, 16, 16),
            compute_instance_norm_grad_sample,
            None,
        ),
    ]


def median_ms(fn, repeats: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"batch {args.batch_size}, device {device}, median of {args.repeats} runs (ms)\n")
    print("| layer | forward+backward | grad sampler | ratio | norm sampler | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, layer, make_input, grad_sampler, norm_sampler in cases(args.batch_size):
        layer = layer.to(device)
        x = make_input().to(device)
        backprops = torch.randn_like(layer(x))

        def train_step():
            layer.zero_grad(set_to_none=True)
            (layer(x) * backprops).sum().backward()

        base = median_ms(train_step, args.repeats, device)
        with torch.no_grad():
            grad = median_ms(lambda: grad_sampler(layer, [x], backprops), args.repeats, device)
            norm = (
                median_ms(lambda: norm_sampler(layer, [x], backprops), args.repeats, device)
                if norm_sampler is not None
                else None
            )
        norm_cells = f"{norm:.3f} | {norm / base:.2f}x" if norm is not None else "- | -"
        print(f"| {name} | {base:.3f} | {grad:.3f} | {grad / base:.2f}x | {norm_cells} |")


if __name__ == "__main__":
    main()

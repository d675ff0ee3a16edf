"""Brute-force DP-SGD references for the optimizer suites (loops over samples on purpose).

Per-sample gradients come from ``tests.oracle.brute_force_grad_samples``; clipping here is written
sample by sample from the definition (Abadi et al. 2016), independent of opacus.optimizers.
"""

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.oracle import brute_force_grad_samples


def small_model(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def batch(n: int, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=dtype) * 3
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def ce_loss(output, target):
    return F.cross_entropy(output, target, reduction="sum")


def oracle_grad_samples(model: nn.Module, x, y) -> Dict[str, torch.Tensor]:
    """``{name: (batch, *shape)}``: gradient of each sample's own cross-entropy loss."""
    return brute_force_grad_samples(model, x, loss_fn=ce_loss, targets=y)


def set_grad_samples(model: nn.Module, x, y, source: Optional[nn.Module] = None) -> None:
    """``p.grad_sample`` from the oracle; ``source``: an identical model to differentiate instead
    (when ``model``'s parameters carry gradient hooks that the oracle's backward would fire)."""
    gs = oracle_grad_samples(model if source is None else source, x, y)
    for n, p in model.named_parameters():
        p.grad_sample = gs[n].clone() if p.requires_grad else None


def reference_dp_step(model: nn.Module, x, y, expected_batch_size: int, loss_reduction: str):
    """One noise-free ``DPOptimizer`` SGD step (lr 0.1, clip 0.2) on brute-force per-sample grads:
    the oracle the fast-gradient-clipping optimizers are compared with."""
    from opacus.optimizers import DPOptimizer

    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=0.2,
        expected_batch_size=expected_batch_size,
        loss_reduction=loss_reduction,
    )
    set_grad_samples(model, x, y)
    optimizer.step()


def clipped_sum_flat(grad_samples: Sequence[torch.Tensor], c: float) -> List[torch.Tensor]:
    """Sample by sample: flatten, clip the whole vector to ``c``, add up."""
    b = grad_samples[0].shape[0]
    out = [
        torch.zeros_like(g[0]) if b else torch.zeros(g.shape[1:], dtype=g.dtype)
        for g in grad_samples
    ]
    for i in range(b):
        norm = torch.cat([g[i].reshape(-1) for g in grad_samples]).norm()
        factor = min(1.0, c / (norm.item() + 1e-6))
        for k, g in enumerate(grad_samples):
            out[k] += factor * g[i]
    return out


def clipped_sum_per_layer(
    grad_samples: Sequence[torch.Tensor], cs: Sequence[float]
) -> List[torch.Tensor]:
    """Sample by sample, parameter by parameter: clip each to its own bound, add up."""
    out = [torch.zeros_like(g[0]) for g in grad_samples]
    for i in range(grad_samples[0].shape[0]):
        for k, (g, c) in enumerate(zip(grad_samples, cs)):
            factor = min(1.0, c / (g[i].norm().item() + 1e-6))
            out[k] += factor * g[i]
    return out


def dp_grads(
    model: nn.Module,
    x,
    y,
    *,
    max_grad_norm,
    expected_batch_size: Optional[int],
    loss_reduction: str = "mean",
    per_layer: bool = False,
) -> List[torch.Tensor]:
    """The noiseless DP gradient of one logical step on ``(x, y)``, per parameter."""
    gs = oracle_grad_samples(model, x, y)
    grad_samples = [gs[n] for n, _ in model.named_parameters()]
    if per_layer:
        sums = clipped_sum_per_layer(grad_samples, max_grad_norm)
    else:
        sums = clipped_sum_flat(grad_samples, max_grad_norm)
    if loss_reduction == "mean":
        sums = [s / expected_batch_size for s in sums]
    return sums


def step_with_grads(model: nn.Module, optimizer: torch.optim.Optimizer, grads) -> None:
    """Reference update: put ``grads`` in ``p.grad`` and run the plain optimizer."""
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    optimizer.step()


_PRELOAD = ["torch", "torch.distributed", "opacus.optimizers", "tests.optimizers.dp_reference"]


def run_distributed(worker, world_size: int = 2, *args) -> None:
    """Run ``worker(rank, world_size, init_file, *args)`` in ``world_size`` CPU processes (gloo).

    Started from a fork server that imported torch once (a plain fork is unsafe once autograd
    has started threads; a spawn re-imports torch in every process); a failure in any process is
    re-raised here by ``torch.multiprocessing``.
    """
    import multiprocessing
    import os
    import tempfile

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(
            worker,
            args=(world_size, init_file, *args),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )


def init_gloo(rank: int, world_size: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )


#: Start method of the multi-process tests' ranks. ``fork`` is fast, but where CUDA is present
#: the parent's autograd engine may already run device threads, which a forked child cannot
#: use ("Unable to handle autograd's threading in combination with fork-based
#: multiprocessing"): there the ranks are spawned.
START_METHOD = "spawn" if torch.cuda.is_available() else "fork"


def cpu_mesh(world_size: int):
    """A one-dimensional CPU device mesh over the gloo ranks: ``fully_shard`` without a mesh
    takes the accelerator's device type where one is present, and these tests run on CPU."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size,))

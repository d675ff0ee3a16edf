"""The floor under a ghost-clipping step: the same maths written by hand, without hooks.

For the two small workloads whose direct ghost targets are tight (``mlp``: 400k parameters,
``embedding``: 320k), this runs four steps on identical copies of the model, alternated in one
process, and reports each one's process CPU time relative to the non-private step:

* ``plain``: the non-private SGD step (``benchmarks.run``'s baseline);
* ``plain+noise``: the non-private step plus drawing the Gaussian noise of every parameter
  (``torch.normal``, what any DP-SGD step must draw);
* ``by hand``: a ghost-clipping DP step written out for this model alone: per-sample losses, one
  pass of ``torch.autograd.grad`` to the layers' outputs, the ghost norms of every layer, clip
  factors, book-kept clipped sums, noise drawn scaled and added in one pass, the SGD update. No
  hooks, no checks, no bookkeeping of calls: what a library's step could cost at best while it
  keeps ``p.grad`` equal to the clipped sum after the backward pass (as Opacus 1.6 does);
* ``library``: ``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping`` +
  ``DPLossFastGradientClipping`` (``benchmarks.run``'s ``ghost_direct`` row).

``by hand`` computes the library's update (``tests/test_benchmarks.py`` checks both against each
other under the same noise seed), so the gap between the two is the library's own overhead and
``by hand`` is the floor for any implementation of these semantics in Python.

Usage: ``python -m benchmarks.floor [--models mlp,embedding] [--repeats 300] [--quick]``
"""

import argparse
import copy
import os
import statistics
import sys
import time
import weakref
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.models import WORKLOADS, TokenClassifier  # noqa: E402
from benchmarks.run import _direct_dp_step, _plain_step  # noqa: E402

NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LR = 0.01
CLIP_EPS = 1e-6


def _clip(squared_norms: torch.Tensor) -> torch.Tensor:
    return (MAX_GRAD_NORM / (squared_norms.sqrt() + CLIP_EPS)).clamp(max=1.0)


def _noise_and_update(model: nn.Module, params: List[nn.Parameter], batch: int) -> None:
    """``p.grad = (clipped sum + N(0, (sigma C)^2)) / B`` in one pass, then the model's own
    ``torch.optim.SGD`` step and ``zero_grad`` (as in the non-private step)."""
    std = NOISE_MULTIPLIER * MAX_GRAD_NORM / batch
    for p in params:
        p.grad = torch.normal(0.0, std, size=p.shape).add_(p.grad, alpha=1.0 / batch)
    optimizer = _optimizers.get(model)
    if optimizer is None:
        optimizer = _optimizers[model] = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


_optimizers: "weakref.WeakKeyDictionary[nn.Module, torch.optim.Optimizer]" = (
    weakref.WeakKeyDictionary()
)


def mlp_step_by_hand(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> None:
    """One ghost-clipping DP step of a ``Linear``/``ReLU`` stack, written out."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    inputs, outputs, h = [], [], x
    for m in model:
        if isinstance(m, nn.Linear):
            inputs.append(h)
            h = m(h)
            outputs.append(h)
        else:
            h = m(h)
    # Summed per-sample losses: each output gradient row is that sample's own.
    backprops = torch.autograd.grad(F.cross_entropy(h, y, reduction="sum"), outputs)
    squared = None
    for a, b in zip(inputs, backprops):
        # One position: ||b a^T||^2 = ||a||^2 ||b||^2 (weight), ||b||^2 (bias).
        b_sq = torch.linalg.vector_norm(b, dim=1).square_()
        layer = torch.linalg.vector_norm(a, dim=1).square_().mul_(b_sq).add_(b_sq)
        squared = layer if squared is None else squared.add_(layer)
    coef = _clip(squared)
    for m, a, b in zip(linears, inputs, backprops):
        b_clipped = b * coef.unsqueeze(1)
        m.weight.grad = b_clipped.t() @ a
        m.bias.grad = b_clipped.sum(0)
    _noise_and_update(model, [p for m in linears for p in (m.weight, m.bias)], x.shape[0])


def embedding_step_by_hand(model: TokenClassifier, x: torch.Tensor, y: torch.Tensor) -> None:
    """One ghost-clipping DP step of ``Embedding -> mean over tokens -> Linear``, written out."""
    emb, fc = model.embedding, model.fc
    batch, vocab = x.shape[0], emb.num_embeddings
    e = emb(x)
    h = e.mean(dim=1)
    out = fc(h)
    b_emb, b_fc = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), [e, out])
    b_sq = torch.linalg.vector_norm(b_fc, dim=1).square_()
    squared = torch.linalg.vector_norm(h, dim=1).square_().mul_(b_sq).add_(b_sq)
    # Embedding: the rows a sample reads, each the sum of its positions' output gradients.
    keys = (torch.arange(batch).unsqueeze(1) * vocab + x).reshape(-1)
    rows, group = torch.unique(keys, return_inverse=True)
    flat = b_emb.reshape(-1, b_emb.shape[-1])
    summed = torch.zeros(rows.shape[0], flat.shape[1]).index_add_(0, group, flat)
    owner = torch.div(rows, vocab, rounding_mode="floor")
    squared.index_add_(0, owner, torch.linalg.vector_norm(summed, dim=1).square_())
    coef = _clip(squared)
    b_fc_clipped = b_fc * coef.unsqueeze(1)
    fc.weight.grad = b_fc_clipped.t() @ h
    fc.bias.grad = b_fc_clipped.sum(0)
    clipped = (b_emb * coef.view(-1, 1, 1)).reshape(-1, flat.shape[1])
    emb.weight.grad = torch.zeros_like(emb.weight).index_add_(0, x.reshape(-1), clipped)
    _noise_and_update(model, [emb.weight, fc.weight, fc.bias], batch)


BY_HAND: Dict[str, Callable] = {"mlp": mlp_step_by_hand, "embedding": embedding_step_by_hand}


def _plain_with_noise(model: nn.Module, x, y) -> Callable[[], None]:
    plain = _plain_step(model, x, y)
    shapes = [p.shape for p in model.parameters()]

    def step():
        plain()
        for s in shapes:
            torch.normal(0.0, 1.0, size=s)

    return step


def steps(name: str, size: str, batch: int) -> Dict[str, Callable[[], None]]:
    """The four steps of ``name`` (module docstring), each on its own copy of one model."""
    w = WORKLOADS[name]
    torch.manual_seed(0)
    base = w.build(size)
    x, y = w.make_batch(batch, size)
    hand_model = copy.deepcopy(base)
    return {
        "plain": _plain_step(copy.deepcopy(base), x, y),
        "plain+noise": _plain_with_noise(copy.deepcopy(base), x, y),
        "by hand": lambda: BY_HAND[name](hand_model, x, y),
        "library": _direct_dp_step(copy.deepcopy(base), x, y, "ghost_direct", True),
    }


def measure(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 20) -> Dict[str, float]:
    """Median process CPU time (ms) of each function, the functions alternated step by step."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: Optional[List[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,embedding")
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny models, few repeats (smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = "tiny" if args.quick else "full"
    repeats = 3 if args.quick else args.repeats
    rows = []
    print(
        f"{args.threads} thread(s), batch {args.batch_size}, medians of {repeats} alternated "
        "steps, process CPU time; ratio = step / non-private step\n"
    )
    print("| model | plain ms | plain+noise | by hand | library | library - by hand (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        t = measure(steps(name, size, args.batch_size), repeats, warmup=2 if args.quick else 20)
        ratio = {k: v / t["plain"] for k, v in t.items()}
        rows.append({"model": name, "ms": t, "ratio": ratio})
        print(
            f"| {name} | {t['plain']:.2f} | {ratio['plain+noise']:.2f} | {ratio['by hand']:.2f} "
            f"| {ratio['library']:.2f} | {t['library'] - t['by hand']:.2f} |"
        )
    return rows


if __name__ == "__main__":
    main()

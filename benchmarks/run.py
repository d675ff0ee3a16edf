"""DP step vs non-private step, per model and per grad-sample mode.

For each model in ``benchmarks/models.py`` and each mode (``hooks``, ``functorch``, ``ghost``) this
times, in one process, a full DP step made through ``PrivacyEngine.make_private`` (forward,
backward, ``optimizer.step()`` with flat clipping and noise, ``zero_grad``) and the non-private
step of an identical model (forward, backward, SGD step, ``zero_grad``).  The two are timed in
alternation (one DP step, one plain step, ...) so a load change on a shared machine hits both;
the ratio is of medians of CPU time of this process (``time.process_time``, which other processes
cannot inflate), wall-clock medians are reported too; on an accelerator (``--device cuda``) the
ratio and the ms columns are of wall time, taken between ``torch.cuda.synchronize()`` calls (the
host's CPU time there is only the launch overhead).  Peak memory is the peak of the allocations
the torch profiler records during one step (``profile_memory=True``), or the CUDA allocator's peak.
Prints a Markdown table; ``--json out.json`` also writes the rows.  Accountant timings follow.

Modes ``hooks_direct`` and ``ghost_direct`` build ``GradSampleModule`` (ghost:
``GradSampleModuleFastGradientClipping`` + ``DPLossFastGradientClipping``) and ``DPOptimizer``
by hand instead of ``PrivacyEngine``; each workload lists the modes it is timed in, its own batch
size if any (the LM: 8) and the optional packages it needs (rows without them are "skipped").

Usage: ``python -m benchmarks.run [--threads 1] [--batch-size 64] [--repeats 20]
[--models mlp,embedding] [--modes hooks,ghost] [--quick] [--json out.json] [--device cpu]``
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # run as ``python benchmarks/run.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.models import ALL_MODES, WORKLOADS, Workload  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402
from opacus.grad_sample.buffers import release_buffers  # noqa: E402
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping  # noqa: E402

MODES = ALL_MODES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_times(
    steps: Dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> Dict[str, Dict[str, float]]:
    """Median CPU and wall ms of each step, the steps run in alternation."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    cpu = {k: [] for k in steps}
    wall = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            _sync(device)
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            _sync(device)
            cpu[name].append((time.process_time() - c0) * 1e3)
            wall[name].append((time.perf_counter() - w0) * 1e3)
    return {
        k: {"cpu_ms": statistics.median(cpu[k]), "wall_ms": statistics.median(wall[k])}
        for k in steps
    }


def peak_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated (above the level at the start) while ``fn()`` runs.

    Per-sample gradient buffers pooled across steps are released first, so they count.
    """
    release_buffers()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    # An op's allocations are its "self" memory; frees outside any op are "[memory]" events.
    # Allocations count from the op's start and frees from its end: an upper bound on the peak.
    deltas = []
    for e in prof.events():
        m = e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage
        if m:
            at = e.time_range.start if m > 0 else e.time_range.end
            deltas.append((at, m))
    deltas.sort(key=lambda d: d[0])
    level = peak = 0
    for _, m in deltas:
        level += m
        peak = max(peak, level)
    return peak


def _flat(out: torch.Tensor, y: torch.Tensor):
    """Token-level outputs ``(B, T, V)`` with labels ``(B, T)`` -> ``(B*T, V)``, ``(B*T,)``
    (a language model's loss, as Hugging Face models compute it); others unchanged."""
    if out.dim() == y.dim() + 1 and out.dim() > 2:
        return out.reshape(-1, out.shape[-1]), y.reshape(-1)
    return out, y


def _loss(criterion, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    flat_out, flat_y = _flat(out, y)
    if flat_out is out or not isinstance(criterion, DPLossFastGradientClipping):
        return criterion(flat_out, flat_y)
    return criterion(flat_out, flat_y, shape=y.shape)  # per-sample losses: (B, T) -> (B,)


def _plain_step(model: nn.Module, x, y) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        loss = F.cross_entropy(*_flat(model(x), y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _direct_dp_step(model: nn.Module, x, y, mode: str, batch_first: bool) -> Callable[[], None]:
    """``GradSampleModule`` (ghost: ``...FastGradientClipping``) and ``DPOptimizer`` built by
    hand, without ``PrivacyEngine`` (its batch-gradient skip does not apply)."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    n = x.shape[1] if not batch_first else x.shape[0]
    dp = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=n)
    if mode == "ghost_direct":
        module = GradSampleModuleFastGradientClipping(
            model, batch_first=batch_first, max_grad_norm=1.0
        )
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(module.parameters(), lr=0.01), **dp
        )
        criterion = DPLossFastGradientClipping(module, optimizer, nn.CrossEntropyLoss())
    else:
        module = GradSampleModule(model, batch_first=batch_first)
        optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=0.01), **dp)
        criterion = nn.CrossEntropyLoss()

    def step():
        loss = _loss(criterion, module(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _dp_step(model: nn.Module, x, y, mode: str, batch_first: bool) -> Callable[[], None]:
    if mode.endswith("_direct"):
        return _direct_dp_step(model, x, y, mode, batch_first)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    n = x.shape[1] if not batch_first else x.shape[0]
    dataset = torch.utils.data.TensorDataset(torch.zeros(n, 1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=n)
    out = PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        batch_first=batch_first,
        poisson_sampling=False,
        grad_sample_mode=mode,
        criterion=nn.CrossEntropyLoss(),
    )
    if mode == "ghost":
        module, optimizer, criterion, _ = out
    else:
        (module, optimizer, _), criterion = out, nn.CrossEntropyLoss()

    def step():
        loss = _loss(criterion, module(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_model(w: Workload, modes: List[str], args, device: torch.device) -> List[dict]:
    """One row per mode: DP step vs the plain step of an identical copy of the model."""
    size = "tiny" if args.quick else "full"
    modes = [m for m in modes if m in w.modes]
    missing = w.missing()
    if missing:
        return [
            {"model": w.name, "mode": m, "skipped": f"needs {', '.join(missing)}"} for m in modes
        ]
    if not modes:
        return []
    torch.manual_seed(0)
    base = w.build(size).to(device)
    x, y = w.make_batch(w.batch_size or args.batch_size, size)
    x, y = x.to(device), y.to(device)
    plain = _plain_step(copy.deepcopy(base), x, y)
    repeats = min(args.repeats, w.max_repeats or args.repeats)
    batch = int(x.shape[0] if w.batch_first else x.shape[1])
    if getattr(args, "shared_baseline", False):
        return _bench_shared_baseline(w, modes, base, x, y, plain, repeats, args, device)
    rows = []
    for mode in modes:
        try:
            dp = _dp_step(copy.deepcopy(base), x, y, mode, w.batch_first)
            t = _median_times({"plain": plain, "dp": dp}, repeats, args.warmup, device)
            mems = peak_memory(plain, device), peak_memory(dp, device)
        except Exception as e:  # report, keep benchmarking the other rows
            rows.append({"model": w.name, "mode": mode, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append(_row(w.name, mode, batch, t["plain"], t["dp"], mems, device))
    return rows


def _bench_shared_baseline(w, modes, base, x, y, plain, repeats, args, device) -> List[dict]:
    """``--shared-baseline``: every mode's DP step and one non-private step run in alternation,
    so that all the rows of a model divide by the same non-private median (comparing modes
    with each other is then free of the baseline's drift between rows)."""
    batch = int(x.shape[0] if w.batch_first else x.shape[1])
    rows, steps = [], {"plain": plain}
    for mode in modes:
        try:
            steps[mode] = _dp_step(copy.deepcopy(base), x, y, mode, w.batch_first)
        except Exception as e:  # report, keep benchmarking the other rows
            rows.append({"model": w.name, "mode": mode, "error": f"{type(e).__name__}: {e}"})
    t = _median_times(steps, repeats, args.warmup, device)
    mem_plain = peak_memory(plain, device)
    for mode in [m for m in modes if m in steps]:
        mems = mem_plain, peak_memory(steps[mode], device)
        rows.append(_row(w.name, mode, batch, t["plain"], t[mode], mems, device))
    return rows


def _row(model: str, mode: str, batch: int, t_plain: dict, t_dp: dict, mems, device) -> dict:
    # On an accelerator the host's CPU time is launch overhead, not the step: compare wall time.
    basis = "cpu_ms" if device.type == "cpu" else "wall_ms"
    mem_plain, mem_dp = mems
    return {
        "model": model,
        "mode": mode,
        "batch": batch,
        "plain_ms": t_plain[basis],
        "dp_ms": t_dp[basis],
        "ratio": t_dp[basis] / t_plain[basis],
        "plain_cpu_ms": t_plain["cpu_ms"],
        "dp_cpu_ms": t_dp["cpu_ms"],
        "plain_wall_ms": t_plain["wall_ms"],
        "dp_wall_ms": t_dp["wall_ms"],
        "wall_ratio": t_dp["wall_ms"] / t_plain["wall_ms"],
        "plain_peak_mb": mem_plain / 2**20,
        "dp_peak_mb": mem_dp / 2**20,
        "mem_ratio": mem_dp / mem_plain if mem_plain else float("nan"),
    }


def bench_accountants(quick: bool) -> List[dict]:
    """Wall and CPU time of the accountants' epsilon and noise calibration."""
    from benchmarks.accountants import best_of
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    steps = 1000 if quick else 100_000
    rows = []
    for name, acc in [("rdp", RDPAccountant()), ("prv", PRVAccountant())]:
        acc.history = [(1.0, 1e-3, steps)]
        wall, cpu, eps = best_of(lambda: acc.get_epsilon(1e-5), 1 if quick else 3)
        rows.append(
            {
                "what": f"{name} get_epsilon ({steps} steps)",
                "wall_ms": wall * 1e3,
                "cpu_ms": cpu * 1e3,
                "value": eps,
            }
        )
    if not quick:
        wall, cpu, sigma = best_of(
            lambda: get_noise_multiplier(
                target_epsilon=2.0,
                target_delta=1e-5,
                sample_rate=1e-3,
                steps=steps,
                accountant="rdp",
            ),
            1,
        )
        rows.append(
            {
                "what": f"rdp get_noise_multiplier ({steps} steps)",
                "wall_ms": wall * 1e3,
                "cpu_ms": cpu * 1e3,
                "value": sigma,
            }
        )
    return rows


def to_markdown(rows: List[dict], acc_rows: List[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | mode | plain ms | DP ms | ratio | ratio (wall) | plain peak MB "
        "| DP peak MB | mem ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['mode']} | skipped: {r['skipped']} |||||||")
            continue
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | error: {r['error'][:80]} |||||||")
            continue
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['plain_ms']:.2f} | {r['dp_ms']:.2f} | "
            f"{r['ratio']:.2f} | {r['wall_ratio']:.2f} | {r['plain_peak_mb']:.2f} | "
            f"{r['dp_peak_mb']:.2f} | {r['mem_ratio']:.2f} |"
        )
    if acc_rows:
        lines += ["", "| accountant | wall ms | cpu ms | value |", "| --- | ---: | ---: | ---: |"]
        lines += [
            f"| {r['what']} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} | {r['value']:.4f} |"
            for r in acc_rows
        ]
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--models",
        default=",".join(WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)}",
    )
    p.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES)
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny models, 2 repeats, short accountant runs (smoke test)",
    )
    p.add_argument("--no-accountants", action="store_true")
    p.add_argument(
        "--shared-baseline",
        action="store_true",
        help="alternate every mode of a model with one non-private step (one denominator)",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), 1
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in models if m not in WORKLOADS] + [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(
            f"unknown --models/--modes {unknown}; choose from "
            f"{list(WORKLOADS)} and {list(MODES)}"
        )
    rows = []
    for name in models:
        rows += bench_model(WORKLOADS[name], modes, args, device)
    acc_rows = [] if args.no_accountants else bench_accountants(args.quick)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    header = (
        f"batch {args.batch_size} (LM rows: 8), {args.threads} thread(s), device {device}, "
        f"{cores} cores available, load average {os.getloadavg()[0]:.2f}, torch "
        f"{torch.__version__}; medians of {args.repeats} alternating repeats"
        + (
            "; every mode of a model alternated with one non-private step"
            if args.shared_baseline
            else ""
        )
        + "; ratio = DP step / non-private step ("
        + ("process CPU time" if device.type == "cpu" else "wall time, CUDA synchronised")
        + ")"
    )
    print(to_markdown(rows, acc_rows, header))
    result = {
        "config": {k: v for k, v in vars(args).items()},
        "header": header,
        "rows": rows,
        "accountants": acc_rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

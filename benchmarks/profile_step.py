"""Profile one DP step of a workload of ``benchmarks/models.py`` beside its non-private step.

Prints (1) the cProfile of ``repeats`` DP steps, top functions by cumulative and by own time,
restricted to this library's files, and (2) the torch profiler's top operators of one DP step
and of one non-private step, so that the time a DP step adds can be split into tensor work and
Python overhead (hook dispatch, bookkeeping, per-tensor loops).

Usage: ``python -m benchmarks.profile_step --model gpt2 --mode ghost [--repeats 5]
[--top 25] [--quick]``
"""

import argparse
import copy
import cProfile
import io
import os
import pstats
import sys
import time
from typing import List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.models import WORKLOADS  # noqa: E402
from benchmarks.run import MODES, _dp_step, _plain_step  # noqa: E402


def _torch_profile(fn, top: int, label: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return f"### torch profiler, one {label} step (self CPU time)\n\n```\n{table}\n```\n"


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=list(WORKLOADS))
    p.add_argument("--mode", default="ghost", choices=list(MODES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = WORKLOADS[args.model]
    if w.missing():
        raise SystemExit(f"{w.name} needs {', '.join(w.missing())}")
    size = "tiny" if args.quick else "full"
    torch.manual_seed(0)
    base = w.build(size)
    x, y = w.make_batch(w.batch_size or 64, size)
    plain = _plain_step(copy.deepcopy(base), x, y)
    dp = _dp_step(copy.deepcopy(base), x, y, args.mode, w.batch_first)
    for _ in range(2):
        plain()
        dp()
    times = {}
    for name, fn in [("plain", plain), ("dp", dp)]:
        t0 = time.process_time()
        for _ in range(args.repeats):
            fn()
        times[name] = (time.process_time() - t0) / args.repeats * 1e3
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.repeats):
        dp()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats("opacus|benchmarks", args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    report = [
        f"## {w.name} / {args.mode}: DP {times['dp']:.1f} ms, non-private {times['plain']:.1f} ms "
        f"(ratio {times['dp'] / times['plain']:.2f}), CPU time, {args.threads} thread(s)\n",
        f"### cProfile of {args.repeats} DP steps\n\n```\n{out.getvalue()}\n```\n",
        _torch_profile(dp, args.top, "DP"),
        _torch_profile(plain, args.top, "non-private"),
    ]
    print("\n".join(report))
    return times


if __name__ == "__main__":
    main()

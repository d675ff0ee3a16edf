"""Timing of the privacy accountants: ``python benchmarks/accountants.py``.

Targets (100,000 steps, noise_multiplier 1.0, sample_rate 0.001, delta 1e-5):
PRVAccountant.get_epsilon < 100 ms, RDPAccountant.get_epsilon < 10 ms,
get_noise_multiplier(accountant="prv") < 2 s.
Each number is the best of several runs; the RDP one is measured with a cold cache (its per-step
RDP curve is memoised across calls, as happens during training).
"""

import time

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

SIGMA, Q, STEPS, DELTA = 1.0, 1e-3, 100_000, 1e-5


def best_of(fn, repeats, before=None):
    """(best wall-clock seconds, best CPU seconds of this process, last value)."""
    walls, cpus, value = [], [], None
    for _ in range(repeats):
        if before is not None:
            before()
        start, start_cpu = time.perf_counter(), time.process_time()
        value = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return min(walls), min(cpus), value


def main():
    prv = PRVAccountant()
    prv.history = [(SIGMA, Q, STEPS)]
    rdp = RDPAccountant()
    rdp.history = [(SIGMA, Q, STEPS)]

    t_prv, c_prv, eps_prv = best_of(lambda: prv.get_epsilon(DELTA), 7)
    t_rdp, c_rdp, eps_rdp = best_of(
        lambda: rdp.get_epsilon(DELTA), 7, before=rdp_analysis._rdp_single_step.cache_clear
    )
    t_rdp_warm, c_rdp_warm, _ = best_of(lambda: rdp.get_epsilon(DELTA), 7)
    t_gnm, c_gnm, sigma = best_of(
        lambda: get_noise_multiplier(
            target_epsilon=eps_prv,
            target_delta=DELTA,
            sample_rate=Q,
            steps=STEPS,
            accountant="prv",
        ),
        3,
    )
    t_gnm_rdp, c_gnm_rdp, sigma_rdp = best_of(
        lambda: get_noise_multiplier(
            target_epsilon=eps_prv,
            target_delta=DELTA,
            sample_rate=Q,
            steps=STEPS,
            accountant="rdp",
        ),
        3,
        before=rdp_analysis._rdp_single_step.cache_clear,
    )
    rows = [
        ("PRVAccountant.get_epsilon", t_prv, c_prv, 0.1, f"eps={eps_prv:.4f}"),
        ("RDPAccountant.get_epsilon (cold)", t_rdp, c_rdp, 0.01, f"eps={eps_rdp:.4f}"),
        ("RDPAccountant.get_epsilon (cached)", t_rdp_warm, c_rdp_warm, 0.01, ""),
        ("get_noise_multiplier(prv)", t_gnm, c_gnm, 2.0, f"sigma={sigma:.4f}"),
        ("get_noise_multiplier(rdp)", t_gnm_rdp, c_gnm_rdp, 2.0, f"sigma={sigma_rdp:.4f}"),
    ]
    print(f"steps={STEPS} noise_multiplier={SIGMA} sample_rate={Q} delta={DELTA}")
    print("wall = best wall-clock time; cpu = best CPU time of this process (what a loaded")
    print("machine cannot steal; FFTs may use several threads, so cpu can exceed wall)")
    for name, seconds, cpu, target, note in rows:
        status = "ok" if seconds < target else "SLOW"
        print(
            f"{name:36s} wall {seconds * 1e3:8.1f} ms  cpu {cpu * 1e3:8.1f} ms  "
            f"(target {target * 1e3:.0f} ms, {status})  {note}"
        )


if __name__ == "__main__":
    main()

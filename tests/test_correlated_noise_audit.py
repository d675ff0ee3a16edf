"""opacus.auditing on banded MF: no violation with cyclic Poisson sampling at the claimed eps, a
violation when the canaries are Poisson-sampled over all steps (plain Poisson over the whole data
set, which voids the amplification theorem).

Configuration: 64 samples, b = 4 groups of 16, batch 16 so the per-group rate is q = 1, T = 4
steps (one cycle), sigma = 1, delta = 1e-2 (as in tests/auditing: affordable audits only see
the tails at delta ~ 1/trials). Claimed: DP-SGD with ceil(4/4) = 1 step at q = 1, i.e. a Gaussian
mechanism with mu = 1/sigma. A canary that takes part in all 4 steps has, in the final model, mu
= 4 / (sigma ||c|| ||C^{-T} 1||) ~ 2.7/sigma (canaries of the right group: ~0.67/sigma).
"""

import math

import numpy as np
import torch
from torch import nn

from opacus.auditing import (
    CanaryModule,
    audit_dp_sgd,
    dirac_canary_gradients,
    eps_lower_from_scores,
    insert_canary_gradients,
)
from opacus.privacy_engine import PrivacyEngine

BANDS, STEPS, DELTA = 4, 4, 1e-2
KW = dict(noise_multiplier=1.0, max_grad_norm=1.0, noise_mechanism="banded_mf", bands=BANDS)


def tiny_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)


def linear():
    return nn.Linear(4, 2)


def cyclic_canary_scores(included: np.ndarray, seed: int = 0):
    """The gradient-canary experiment of opacus.auditing, with canary ``k`` in group ``k mod b``
    (it joins step ``t`` only if ``t mod b`` is its group, then with probability q)."""
    runs, num = included.shape
    groups = torch.arange(num) % BANDS
    scores = np.zeros((runs, num))
    gen = torch.Generator().manual_seed(seed)
    x, y = tiny_data()
    eps_claimed = math.nan
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in range(runs):
            torch.manual_seed(r)
            model = CanaryModule(linear(), num)
            engine = PrivacyEngine(accountant="rdp")
            module, opt, loader = engine.make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                data_loader=torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(x, y), batch_size=16
                ),
                **KW,
            )
            q = loader.sample_rate
            canary = model.canary.weight
            start = canary.detach().clone()
            member = torch.as_tensor(included[r])
            batches = iter(loader)
            for t in range(STEPS):
                xb, yb = next(batches)
                opt.zero_grad()
                nn.functional.cross_entropy(module(xb), yb).backward()
                in_batch = member & (groups == t % BANDS) & (torch.rand(num, generator=gen) < q)
                rows = dirac_canary_gradients(in_batch, 10.0, dtype=canary.dtype)
                insert_canary_gradients(opt.params, canary, rows, generator=gen)
                opt.step()
            scores[r] = (start - canary.detach()).flatten().double().numpy()
            if r == 0:
                eps_claimed = engine.get_epsilon(DELTA)
    finally:
        torch.set_num_threads(threads)
    return scores, eps_claimed


def test_cyclic_banded_mf_passes_the_audit():
    rng = np.random.default_rng(0)
    included = rng.permutation(np.arange(4 * 1000) % 2 == 0).reshape(4, 1000)
    scores, eps_claimed = cyclic_canary_scores(included)
    audit = eps_lower_from_scores(scores[included], scores[~included], delta=DELTA)
    assert 1.5 < eps_claimed < 3.5
    assert audit.eps_lower <= eps_claimed, (audit.eps_lower, eps_claimed)
    # the canaries are seen: the signal is there, just within the claimed budget
    assert scores[included].mean() > scores[~included].mean()


def test_plain_poisson_canaries_with_bands_are_flagged():
    # audit_dp_sgd Poisson-samples every canary at the loader's rate at every step: the
    # variant the amplification theorem does not cover.
    res = audit_dp_sgd(
        linear,
        tiny_data(),
        KW,
        trials=4000,
        canaries_per_run=1000,
        steps=STEPS,
        batch_size=16,
        delta=DELTA,
        accountant="rdp",
    )
    assert res.violation, res.summary()

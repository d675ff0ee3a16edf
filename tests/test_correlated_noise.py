"""Banded matrix-factorization noise (opacus.optimizers.correlated_noise) against independent
oracles: dense matrices (C, C^{-1}, A C^{-1} built entry by entry and inverted by LAPACK), the
empirical moments of the stream with tolerances from their standard errors, the DP-SGD
accountant at the reduced arguments, and bit-for-bit DP-SGD for b = 1."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import CyclicPoissonDataLoader, DPDataLoader
from opacus.optimizers.correlated_noise import (
    BandedMatrixFactorizationNoise,
    banded_sqrt_coefficients,
    optimized_coefficients,
    prefix_sum_error,
)
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import CyclicPoissonSampler


def dense_c(coeffs, horizon):
    """The T x T lower-triangular banded Toeplitz C, entry by entry."""
    c = torch.zeros(horizon, horizon, dtype=torch.float64)
    for i in range(horizon):
        for j, cj in enumerate(coeffs):
            if i - j >= 0:
                c[i, i - j] = cj
    return c


def stream(mechanism, steps, n, std, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zeros = [torch.zeros(n, dtype=dtype)]
    return torch.stack(
        [next(mechanism.with_noise(std, zeros, generator=g))[1] for _ in range(steps)]
    )


# ---------------------------------------------------------------- coefficients
def test_banded_sqrt_coefficients_are_the_binomial_series():
    coeffs = banded_sqrt_coefficients(7)
    assert coeffs == pytest.approx([math.comb(2 * j, j) / 4**j for j in range(7)], rel=1e-15)
    # the full (non-banded) square root: C @ C is the all-ones lower triangle A
    c = dense_c(banded_sqrt_coefficients(12), 12)
    torch.testing.assert_close(c @ c, torch.tril(torch.ones(12, 12, dtype=torch.float64)))
    assert BandedMatrixFactorizationNoise(bands=3).column_norm == pytest.approx(
        math.sqrt(1 + 0.25 + 0.375**2)
    )


@pytest.mark.parametrize("bands,horizon", [(1, 10), (2, 7), (4, 30), (5, 64)])
def test_prefix_sum_error_matches_dense_factorization(bands, horizon):
    coeffs = banded_sqrt_coefficients(bands)
    c = dense_c(coeffs, horizon)
    b = torch.tril(torch.ones(horizon, horizon, dtype=torch.float64)) @ torch.linalg.inv(c)
    col = c.norm(dim=0).max()  # maximal column norm of C over the horizon
    assert prefix_sum_error(coeffs, horizon) == pytest.approx(float(col**2 * (b**2).sum()))
    if bands == 1:
        assert prefix_sum_error(coeffs, horizon) == horizon * (horizon + 1) / 2


@pytest.mark.parametrize("bands,horizon", [(2, 20), (3, 50), (6, 100), (8, 40)])
def test_optimized_coefficients_never_worse_than_banded_sqrt(bands, horizon):
    opt = optimized_coefficients(bands, horizon)
    assert len(opt) == bands and opt[0] == 1.0
    sqrt_err = prefix_sum_error(banded_sqrt_coefficients(bands), horizon)
    assert prefix_sum_error(opt, horizon) <= sqrt_err * (1 + 1e-12)
    # at these horizons the banded square root is not optimal: strictly better
    assert prefix_sum_error(opt, horizon) < 0.999 * sqrt_err


@pytest.mark.parametrize("bad", [[], [0.5, 0.1], [1.0, float("nan")], "abc", [1.0, None]])
def test_bad_coefficients_are_refused(bad):
    with pytest.raises(ValueError, match="BandedMatrixFactorizationNoise"):
        BandedMatrixFactorizationNoise(bad)


@pytest.mark.parametrize("bands", [0, -1, 1.5, True, None])
def test_bad_bands_are_refused(bands):
    with pytest.raises(ValueError, match="bands"):
        BandedMatrixFactorizationNoise(bands=bands)


# ---------------------------------------------------------------- the stream
@pytest.mark.parametrize("coeffs", [banded_sqrt_coefficients(3), [1.0, -0.4, 0.7, 0.2]])
def test_stream_covariance_is_sigma2_cinv_cinvT(coeffs):
    # Each of the n coordinates is an independent copy of the T-step stream.
    T, n, std = 7, 200_000, 1.3
    mech = BandedMatrixFactorizationNoise(coeffs)
    w = stream(mech, T, n, std)  # (T, n)
    cinv = torch.linalg.inv(dense_c(coeffs, T))
    expected = (std * mech.column_norm) ** 2 * cinv @ cinv.T
    empirical = w @ w.T / n  # mean is 0 by construction
    # standard error of a sample covariance entry of a Gaussian vector
    se = ((expected.diag()[:, None] * expected.diag()[None, :] + expected**2) / n).sqrt()
    assert ((empirical - expected).abs() <= 5 * se).all(), (empirical - expected) / se
    # The stream is exactly C^{-1} z: applying C gives i.i.d. N(0, (std ||C||_col)^2) rows.
    z = dense_c(coeffs, T) @ w
    zc = z @ z.T / n
    target = (std * mech.column_norm) ** 2
    assert (zc.diag() - target).abs().max() < 5 * target * math.sqrt(2 / n)
    assert (zc - torch.diag(zc.diag())).abs().max() < 5 * target / math.sqrt(n)


def test_prefix_sums_have_the_factorization_variance():
    T, n, std, bands = 12, 200_000, 0.8, 4
    mech = BandedMatrixFactorizationNoise(bands=bands)
    prefix = stream(mech, T, n, std, seed=3).cumsum(0)
    b = torch.tril(torch.ones(T, T, dtype=torch.float64)) @ torch.linalg.inv(
        dense_c(mech.coefficients, T)
    )
    expected = (std * mech.column_norm) ** 2 * (b**2).sum(1)
    empirical = prefix.pow(2).mean(1)
    assert ((empirical - expected).abs() <= 5 * expected * math.sqrt(2 / n)).all()
    # and the total over the horizon is the objective the coefficients minimise
    assert float(expected.sum()) == pytest.approx(
        std**2 * prefix_sum_error(mech.coefficients, T), rel=1e-12
    )
    # far below DP-SGD's prefix-sum variance at the same std (t + 1 at step t)
    assert float(expected[-1]) < 0.5 * std**2 * T


def test_bands_one_is_plain_gaussian_noise_bit_for_bit():
    from opacus.optimizers.noise import with_gaussian_noise

    mech = BandedMatrixFactorizationNoise(bands=1)
    tensors = [torch.randn(3, 4), torch.randn(5)]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        a = dict(mech.with_noise(0.7, tensors, generator=g1))
        b = dict(with_gaussian_noise(0.7, tensors, generator=g2))
        assert all(torch.equal(a[i], b[i]) for i in b)
    assert mech.steps == 3


def test_zero_std_adds_nothing_and_keeps_zero_history():
    # the non-zero ranks of data-parallel training ask for std 0
    mech = BandedMatrixFactorizationNoise(bands=3)
    t = [torch.randn(4)]
    for _ in range(4):
        assert torch.equal(dict(mech.with_noise(0.0, t))[0], t[0])


def test_checkpoint_restore_continues_the_same_stream():
    n, std = 50, 1.0
    mech = BandedMatrixFactorizationNoise(bands=4)
    g = torch.Generator().manual_seed(11)
    zeros = [torch.zeros(n)]
    for _ in range(5):
        list(mech.with_noise(std, zeros, generator=g))
    state, gen_state = mech.state_dict(), g.get_state()
    rest = [dict(mech.with_noise(std, zeros, generator=g))[0] for _ in range(4)]

    restored = BandedMatrixFactorizationNoise(bands=4)
    restored.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(gen_state)
    again = [dict(restored.with_noise(std, zeros, generator=g2))[0] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(rest, again))
    assert restored.steps == mech.steps == 9
    # a fresh mechanism (no history) would give a different continuation
    fresh = BandedMatrixFactorizationNoise(bands=4)
    g3 = torch.Generator()
    g3.set_state(gen_state)
    assert not torch.equal(dict(fresh.with_noise(std, zeros, generator=g3))[0], rest[0])
    with pytest.raises(ValueError, match="coefficients"):
        BandedMatrixFactorizationNoise(bands=3).load_state_dict(state)


def test_std_change_and_shape_change_are_refused():
    mech = BandedMatrixFactorizationNoise(bands=2)
    list(mech.with_noise(1.0, [torch.zeros(3)]))
    with pytest.raises(ValueError, match="std.*changed"):
        list(mech.with_noise(2.0, [torch.zeros(3)]))
    with pytest.raises(ValueError, match="parameters changed"):
        list(mech.with_noise(1.0, [torch.zeros(4)]))


# ---------------------------------------------------------------- cyclic Poisson sampling
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 60), bands=st.integers(1, 8), seed=st.integers(0, 3))
def test_cyclic_groups_partition_the_dataset(n, bands, seed):
    if n < bands:
        with pytest.raises(ValueError, match="bands"):
            CyclicPoissonSampler(num_samples=n, sample_rate=0.5, bands=bands)
        return
    s = CyclicPoissonSampler(num_samples=n, sample_rate=0.5, bands=bands, group_seed=seed)
    members = torch.cat(s.groups)
    assert sorted(members.tolist()) == list(range(n))  # each example in exactly one group
    sizes = [len(g) for g in s.groups]
    assert max(sizes) - min(sizes) <= 1


def test_cyclic_sampler_inclusion_probabilities():
    n, bands, q, steps = 40, 4, 0.3, 8000
    s = CyclicPoissonSampler(
        num_samples=n,
        sample_rate=q,
        bands=bands,
        steps=steps,
        generator=torch.Generator().manual_seed(0),
    )
    group_of = torch.empty(n, dtype=torch.long)
    for g, members in enumerate(s.groups):
        group_of[members] = g
    counts = torch.zeros(bands, n)
    for t, batch in enumerate(s):
        counts[t % bands, batch] += 1
    per_phase = steps // bands
    for phase in range(bands):
        inside = group_of == phase
        assert counts[phase, ~inside].sum() == 0  # never sampled outside its group's steps
        rate = counts[phase, inside] / per_phase
        se = math.sqrt(q * (1 - q) / per_phase)
        assert (rate - q).abs().max() < 5 * se
    assert s.step == steps


def test_cyclic_sampler_continues_the_cycle_across_epochs():
    s = CyclicPoissonSampler(num_samples=30, sample_rate=1.0, bands=4, steps=3)
    seen = [tuple(b) for _ in range(4) for b in s]
    expected = [tuple(s.groups[t % 4].tolist()) for t in range(12)]
    assert seen == expected


def test_cyclic_loader_from_data_loader_keeps_batch_size_and_epoch():
    ds = TensorDataset(torch.randn(120, 2), torch.zeros(120))
    dl = CyclicPoissonDataLoader.from_data_loader(DataLoader(ds, batch_size=10), bands=3)
    assert len(dl) == 12 and dl.bands == 3
    assert dl.sample_rate * 120 / 3 == pytest.approx(10)
    with pytest.raises(ValueError, match="bands"):
        CyclicPoissonDataLoader.from_data_loader(DataLoader(ds, batch_size=10), bands=13)
    with pytest.raises(ValueError, match="batch_size"):
        CyclicPoissonDataLoader(ds, sample_rate=0.5, bands=2, batch_size=4)


# ---------------------------------------------------------------- engine
def _dataset(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def _train(banded=None, *, lr=0.1, noise=1.0, mode="hooks", bmm=None, epochs=2, **extra):
    model = _mlp()
    loader = DataLoader(_dataset(), batch_size=8, generator=torch.Generator().manual_seed(1))
    engine = PrivacyEngine(accountant="rdp")
    kw = dict(extra)
    if banded is not None:
        kw.update(noise_mechanism="banded_mf", bands=banded)
    out = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=0.5,
        grad_sample_mode=mode,
        noise_generator=torch.Generator().manual_seed(7),
        **kw,
    )
    module, opt, dl = out[0], out[1], out[-1]
    criterion = out[2] if mode == "ghost" else nn.CrossEntropyLoss()
    grads = []
    for _ in range(epochs):
        batches = dl
        if bmm is not None:
            manager = BatchMemoryManager(data_loader=dl, max_physical_batch_size=bmm, optimizer=opt)
            batches = manager.__enter__()
        for x, y in batches:
            opt.zero_grad()
            criterion(module(x), y).backward()
            opt.step()
            if not opt._is_last_step_skipped:
                grads.append([p.grad.detach().clone() for p in module.parameters()])
        if bmm is not None:
            manager.__exit__(None, None, None)
    return engine, module, opt, dl, grads


def test_make_private_bands_one_is_dp_sgd_bit_for_bit():
    e1, m1, _, _, _ = _train(None)
    e2, m2, o2, dl2, _ = _train(1)
    assert type(dl2) is DPDataLoader
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert e1.accountant.history == e2.accountant.history
    assert o2.noise_mechanism.bands == 1


def _oracle_noise(opt, steps, std, seed=7):
    """w_t per parameter from an independent replay: z drawn per parameter in order with the
    same seed, then w = C^{-1} z by a dense inverse."""
    mech = opt.noise_mechanism
    g = torch.Generator().manual_seed(seed)
    shapes = [p.shape for p in opt.params]
    z = [
        [torch.normal(0.0, std * mech.column_norm, size=s, generator=g) for s in shapes]
        for _ in range(steps)
    ]
    cinv = torch.linalg.inv(dense_c(mech.coefficients, steps))
    return [
        [sum(cinv[t, s] * z[s][i].double() for s in range(t + 1)) for i in range(len(shapes))]
        for t in range(steps)
    ]


@pytest.mark.parametrize(
    "mode,bmm", [("hooks", None), ("functorch", None), ("ghost", None), ("hooks", 3)]
)
def test_engine_adds_the_streamed_noise_once_per_logical_step(mode, bmm):
    # lr = 0: the model never moves, so noisy minus noise-free gradients is exactly w_t / B.
    _, _, opt, dl, noisy = _train(3, lr=0.0, noise=1.5, mode=mode, bmm=bmm)
    _, _, _, _, clean = _train(3, lr=0.0, noise=0.0, mode=mode, bmm=bmm)
    assert isinstance(dl, CyclicPoissonDataLoader) and dl.bands == 3
    steps = len(noisy)
    assert steps == 12 == opt.noise_mechanism.steps
    expected = _oracle_noise(opt, steps, std=1.5 * 0.5)
    batch = opt.expected_batch_size
    for t in range(steps):
        for i in range(len(expected[t])):
            torch.testing.assert_close(
                ((noisy[t][i] - clean[t][i]) * batch).double(),
                expected[t][i],
                atol=2e-5,
                rtol=1e-4,
            )


def test_accountant_records_the_reduced_dp_sgd():
    engine, _, opt, dl, grads = _train(4, epochs=3)
    T, q = len(grads), dl.sample_rate
    assert T == 18 and q == pytest.approx(4 / 6)
    # the rate applies within a group of 48 / 4: the loader's batch size 8 is kept
    assert opt.expected_batch_size == 8
    assert engine.accountant.history == [(1.0, q, math.ceil(T / 4))]
    oracle = RDPAccountant()
    oracle.history = [(1.0, q, math.ceil(T / 4))]
    assert engine.get_epsilon(1e-5) == oracle.get_epsilon(1e-5)


def test_make_private_with_epsilon_calibrates_through_the_reduction():
    model = _mlp()
    engine = PrivacyEngine(accountant="rdp")
    _, opt, dl = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_dataset(), batch_size=8),
        target_epsilon=2.0,
        target_delta=1e-5,
        epochs=5,
        max_grad_norm=1.0,
        noise_mechanism="banded_mf",
        bands=3,
        noise_coefficients="optimized",
    )
    q, T = dl.sample_rate, 5 * len(dl)
    expected = get_noise_multiplier(
        target_epsilon=2.0,
        target_delta=1e-5,
        sample_rate=q,
        steps=math.ceil(T / 3),
        accountant="rdp",
    )
    assert opt.noise_multiplier == expected
    assert opt.noise_mechanism.coefficients == tuple(optimized_coefficients(3, T))


def test_plain_poisson_or_shuffled_batches_with_bands_are_refused():
    for loader, poisson in (
        (DPDataLoader(_dataset(), sample_rate=0.2), True),
        (DataLoader(_dataset(), batch_size=8), False),
    ):
        model = _mlp()
        with pytest.raises(ValueError, match="cyclic Poisson sampling"):
            PrivacyEngine().make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=poisson,
                noise_mechanism="banded_mf",
                bands=2,
            )


def test_unsafe_opt_out_accounts_without_amplification():
    model = _mlp()
    engine = PrivacyEngine(accountant="rdp")
    _, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DPDataLoader(_dataset(), sample_rate=0.25),
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        noise_mechanism="banded_mf",
        bands=3,
        unsafe_banded_mf_without_cyclic_sampling=True,
    )
    for x, y in dl:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    col = opt.noise_mechanism.column_norm
    c = opt.noise_mechanism.coefficients
    # one full-batch Gaussian event per step, at sensitivity sum_{j<=t} |c_j|
    expected = [2.0 * col / 1.0, 2.0 * col / (1 + c[1])] + [2.0 * col / sum(c)] * (len(dl) - 2)
    recorded = [h[0] for h in engine.accountant.history for _ in range(h[2])]
    assert recorded == pytest.approx(expected)
    assert all(h[1] == 1.0 for h in engine.accountant.history)


def test_unsupported_optimizers_and_kwargs_are_refused():
    model = _mlp()
    common = dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_dataset(), batch_size=8),
        noise_multiplier=1.0,
    )
    with pytest.raises(ValueError, match="adaptive"):
        PrivacyEngine().make_private(
            **common,
            max_grad_norm=1.0,
            clipping="adaptive",
            target_unclipped_quantile=0.5,
            clipbound_learning_rate=0.2,
            max_clipbound=10.0,
            min_clipbound=0.1,
            unclipped_num_std=10.0,
            noise_mechanism="banded_mf",
            bands=2,
        )
    model = _mlp()
    common.update(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="only apply with noise_mechanism"):
        PrivacyEngine().make_private(**common, max_grad_norm=1.0, bands=2)
    with pytest.raises(ValueError, match="noise_mechanism='dp_ftrl'"):
        PrivacyEngine().make_private(**common, max_grad_norm=1.0, noise_mechanism="dp_ftrl")
    with pytest.raises(ValueError, match="needs bands"):
        PrivacyEngine().make_private(**common, max_grad_norm=1.0, noise_mechanism="banded_mf")


def test_engine_checkpoint_restores_the_noise_stream(tmp_path):
    engine, module, opt, dl, _ = _train(3, epochs=1)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(path=path, module=module, optimizer=opt)
    gen_state = opt.generator.get_state()
    zeros = [torch.zeros_like(p) for p in opt.params]
    after = [
        dict(opt.noise_mechanism.with_noise(0.5, zeros, generator=opt.generator)) for _ in "ab"
    ]

    engine2, module2, opt2, _, _ = _train(3, epochs=0)
    engine2.load_checkpoint(path=path, module=module2, optimizer=opt2)
    assert opt2.noise_mechanism.steps == 6
    opt2.generator.set_state(gen_state)
    again = [
        dict(opt2.noise_mechanism.with_noise(0.5, zeros, generator=opt2.generator)) for _ in "ab"
    ]
    for a, b in zip(after, again):
        assert all(torch.equal(a[i], b[i]) for i in a)
    assert engine2.accountant.history == engine.accountant.history

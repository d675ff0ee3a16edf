"""The statistics of opacus.auditing.bounds against scipy, closed forms and simulation."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

from opacus.auditing import (
    clopper_pearson,
    eps_from_error_rates,
    eps_lower_from_counts,
    eps_lower_from_scores,
    one_run_eps_lower,
    one_run_eps_lower_from_scores,
    one_run_tail_bound,
)

E1 = math.e / (1 + math.e)  # randomized response at eps = 1 answers truthfully w.p. e/(1+e)


def gaussian_eps(mu: float, delta: float) -> float:
    """Exact eps(delta) of the Gaussian mechanism (Balle & Wang 2018, Thm 8)."""

    def gap(e):
        return stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2)

    return 0.0 if gap(0.0) <= delta else optimize.brentq(lambda e: gap(e) - delta, 0, 200)


# ---------------------------------------------------------------- Clopper--Pearson
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), frac=st.floats(0, 1), conf=st.sampled_from([0.8, 0.95, 0.99]))
def test_clopper_pearson_matches_scipy_binomtest(n, frac, conf):
    k = int(round(frac * n))
    for alt in ("two-sided", "less", "greater"):
        ci = stats.binomtest(k, n, alternative=alt).proportion_ci(conf, method="exact")
        lo, hi = clopper_pearson(k, n, conf, alternative=alt)
        assert lo == pytest.approx(ci.low, abs=1e-9)
        assert hi == pytest.approx(ci.high, abs=1e-9)


def test_clopper_pearson_coverage_by_simulation():
    rng = np.random.default_rng(0)
    p, n = 0.1, 50
    ks = rng.binomial(n, p, size=2000)
    covered = [clopper_pearson(int(k), n, 0.9, alternative="less")[1] >= p for k in ks]
    assert np.mean(covered) >= 0.9  # exact intervals are conservative


def test_clopper_pearson_rejects_bad_input():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        clopper_pearson(5, 3)
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson(1, 3, confidence=1.5)
    with pytest.raises(ValueError, match="alternative"):
        clopper_pearson(1, 3, alternative="both")
    assert clopper_pearson(0, 0) == (0.0, 1.0)


# ---------------------------------------------------------------- hypothesis-test bound
def test_eps_from_error_rates_closed_forms():
    # Randomized response at eps: FPR = FNR = 1/(1+e^eps) meets both inequalities with equality.
    for eps in (0.1, 1.0, 3.0):
        r = 1 / (1 + math.exp(eps))
        assert eps_from_error_rates(r, r) == pytest.approx(eps)
    assert eps_from_error_rates(0.5, 0.5) == 0.0
    assert eps_from_error_rates(0.0, 0.3) == math.inf
    assert eps_from_error_rates(0.01, 0.5, delta=0.1) == pytest.approx(math.log(0.4 / 0.01))
    assert eps_from_error_rates(0.6, 0.6) == 0.0  # worse than guessing: no evidence


def test_eps_from_error_rates_is_tight_for_gaussian():
    # The Gaussian mechanism's trade-off curve touches the (eps(delta), delta) lines: the best
    # threshold test on N(0,1) vs N(mu,1) error rates gives back eps(delta) exactly.
    mu, delta = 1.0, 1e-3
    t = np.linspace(0, 6, 1201)
    best = max(eps_from_error_rates(stats.norm.sf(ti), stats.norm.cdf(ti - mu), delta) for ti in t)
    assert best == pytest.approx(gaussian_eps(mu, delta), abs=2e-3)


@settings(max_examples=40, deadline=None)
@given(
    fp=st.integers(0, 100),
    fn=st.integers(0, 100),
    extra=st.integers(1, 50),
    delta=st.sampled_from([0.0, 1e-5, 1e-2]),
)
def test_counts_bound_is_monotone(fp, fn, extra, delta):
    n = 200
    base = eps_lower_from_counts(fp, n, fn, n, delta=delta)
    assert eps_lower_from_counts(fp + extra, n, fn, n, delta=delta) <= base + 1e-12
    assert eps_lower_from_counts(fp, n, fn + extra, n, delta=delta) <= base + 1e-12
    # same error rates from more trials: tighter intervals, larger bound
    assert eps_lower_from_counts(2 * fp, 2 * n, 2 * fn, 2 * n, delta=delta) >= base - 1e-12
    assert eps_lower_from_counts(fp, n, fn, n, delta=delta, confidence=0.8) >= base - 1e-12
    assert base <= eps_from_error_rates(fp / n, fn / n, delta)  # bound below point estimate


def test_randomized_response_bound_is_valid_and_close():
    rng = np.random.default_rng(1)
    n = 100_000
    fp, fn = rng.binomial(n, 1 - E1), rng.binomial(n, 1 - E1)
    eps = eps_lower_from_counts(fp, n, fn, n, confidence=0.95)
    assert 0.95 <= eps <= 1.0


def test_randomized_response_bound_coverage():
    # Over many small experiments, eps_lower exceeds the true eps = 1 at most 5% of the time.
    rng = np.random.default_rng(2)
    n = 300
    fps, fns = rng.binomial(n, 1 - E1, 1000), rng.binomial(n, 1 - E1, 1000)
    bounds = np.array([eps_lower_from_counts(a, n, b, n) for a, b in zip(fps, fns)])
    assert np.mean(bounds > 1.0) <= 0.05
    assert np.median(bounds) > 0.5  # and the bound is not vacuous


@pytest.mark.parametrize("method", ["split", "bonferroni"])
def test_score_bound_valid_for_gaussian_and_detects_separation(method):
    rng = np.random.default_rng(3)
    mu, delta = 1.0, 1e-5
    truth = gaussian_eps(mu, delta)
    for seed in range(5):
        s_in, s_out = rng.normal(mu, 1, 1000), rng.normal(0, 1, 1000)
        res = eps_lower_from_scores(s_in, s_out, delta=delta, method=method, seed=seed)
        assert 0.0 <= res.eps_lower <= truth
        assert res.method == method
    far = eps_lower_from_scores(rng.normal(20, 1, 1000), rng.normal(0, 1, 1000), method=method)
    assert far.eps_lower > 4.0 and far.false_positives == 0 and far.false_negatives == 0


def test_score_bound_threshold_selection_not_overfit():
    # Identical distributions: any "evidence" is selection bias. Over many seeds the bound
    # exceeds 0 in at most ~5% of experiments for both corrections.
    rng = np.random.default_rng(4)
    for method in ("split", "bonferroni"):
        hits = [
            eps_lower_from_scores(
                rng.normal(size=100), rng.normal(size=100), method=method, seed=s
            ).eps_lower
            > 0
            for s in range(100)
        ]
        assert np.mean(hits) <= 0.1


def test_score_bound_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        eps_lower_from_scores([1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="method"):
        eps_lower_from_scores([1.0, 2.0], [0.0, 1.0], method="oracle")
    with pytest.raises(ValueError, match="NaN"):
        eps_lower_from_scores([1.0, float("nan")], [0.0, 1.0])


# ---------------------------------------------------------------- one-run bound
def test_one_run_pure_bound_is_binomial_quantile():
    r, c, conf = 500, 340, 0.95
    eps = one_run_eps_lower(r, c, confidence=conf)
    p = 1 / (1 + math.exp(-eps))
    assert stats.binom.sf(c - 1, r, p) == pytest.approx(1 - conf, rel=1e-4)
    assert one_run_tail_bound(eps, r, c, 10 * r) == pytest.approx(stats.binom.sf(c - 1, r, p))
    assert one_run_eps_lower(r, r // 2) == 0.0  # chance accuracy: no evidence


def test_one_run_randomized_response_close_and_valid():
    rng = np.random.default_rng(5)
    r = 20_000
    eps = one_run_eps_lower(r, int(rng.binomial(r, E1)))
    assert 0.95 <= eps <= 1.0
    # Exact coverage for the binomial, the worst case of the theorem: the outcomes whose bound
    # exceeds the true eps = 1 have total probability <= 1 - confidence.
    r = 300
    c_star = next(c for c in range(r + 1) if one_run_eps_lower(r, c) > 1.0)
    assert one_run_eps_lower(r, c_star - 1) <= 1.0
    assert stats.binom.sf(c_star - 1, r, E1) <= 0.05
    assert stats.binom.sf(c_star - 2, r, E1) > 0.05  # and the bound is not needlessly loose


def test_one_run_delta_makes_bound_smaller_and_is_monotone():
    r, m = 400, 1000
    pure = one_run_eps_lower(r, 300, num_canaries=m)
    with_delta = one_run_eps_lower(r, 300, num_canaries=m, delta=1e-5)
    assert with_delta <= pure
    assert with_delta >= pure - 0.2  # a tiny delta costs little
    assert one_run_eps_lower(r, 310, num_canaries=m, delta=1e-5) >= with_delta
    assert one_run_eps_lower(r, 300, num_canaries=m, delta=1e-2) < with_delta


def test_one_run_delta_bound_covers_a_zero_eps_delta_mechanism():
    # Mechanism that reveals each canary's bit w.p. delta and otherwise outputs a fair coin is
    # (0, delta)-DP per canary; the paper's tail must dominate its empirical tail.
    rng = np.random.default_rng(6)
    m, delta = 200, 0.01
    s = rng.random((4000, m)) < 0.5
    reveal = rng.random((4000, m)) < delta
    guess = np.where(reveal, s, rng.random((4000, m)) < 0.5)
    w = (guess == s).sum(1)
    for v in (105, 110, 115, 120):
        assert np.mean(w >= v) <= one_run_tail_bound(0.0, m, v, m, delta) + 0.01


def test_one_run_from_scores_counts_guesses():
    scores = np.array([5.0, 4.0, 3.0, 0.0, -1.0, -2.0])
    included = np.array([True, True, False, True, False, False])
    res = one_run_eps_lower_from_scores(scores, included, k_pos=2, k_neg=2)
    assert (res.num_guesses, res.num_correct, res.num_canaries) == (4, 4, 6)
    res = one_run_eps_lower_from_scores(scores, included, k_pos=3, k_neg=0)
    assert res.num_correct == 2
    with pytest.raises(ValueError, match="k_pos"):
        one_run_eps_lower_from_scores(scores, included, k_pos=5, k_neg=5)
    with pytest.raises(ValueError, match="inclusion flags"):
        one_run_eps_lower_from_scores(scores, included[:3], k_pos=1)


@pytest.mark.parametrize("eps,delta", [(0.5, 1e-3), (1.0, 1e-2), (2.0, 1e-4)])
def test_one_run_delta_bound_dominates_randomized_response_with_leak(eps, delta):
    # Per canary: reveal the bit w.p. delta, else randomized response at eps -- an (eps, delta)-DP
    # mechanism whose correct-guess count is exactly Binomial(r, delta + (1 - delta) p_eps). The
    # paper's tail bound must dominate its tail at every v.
    r = 300
    p = delta + (1 - delta) / (1 + math.exp(-eps))
    for v in range(r // 2, r + 1, 5):
        assert stats.binom.sf(v - 1, r, p) <= one_run_tail_bound(eps, r, v, r, delta) + 1e-12
    # and without the delta term it would not (so the term is doing work)
    assert any(
        stats.binom.sf(v - 1, r, p) > one_run_tail_bound(eps, r, v, r, 0.0)
        for v in range(r // 2, r + 1)
    )


def test_docstring_examples_run():
    import doctest

    import opacus.auditing.bounds as bounds

    result = doctest.testmod(bounds, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0

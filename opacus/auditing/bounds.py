"""Statistical lower bounds on epsilon from the outcomes of a membership (distinguishing) test.

Pure functions of counts and scores: no torch, no training. Two families:

* **Hypothesis-test bounds** (Kairouz, Oh, Viswanath 2015, "The composition theorem for
  differential privacy", Thm 2.1; used for auditing by Jagielski, Ullman, Oprea 2020 and Nasr et al.
  2021, "Adversary instantiation"). Any test that guesses whether a canary was in the training run,
  applied to an (eps, delta)-DP mechanism, has false-positive and false-negative rates with
  ``FPR + e^eps FNR >= 1 - delta`` and ``FNR + e^eps FPR >= 1 - delta``, hence
  ``eps >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR))``.
  The right side decreases in both rates, so plugging in Clopper--Pearson *upper* confidence
  bounds on the rates gives a lower bound on eps that holds with the stated confidence.
* **One-run bound** (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training run",
  Thm 3.1): ``m`` canaries each included independently with probability 1/2, the auditor makes
  ``r`` guesses of which ``c`` are right. For (eps, delta)-DP,
  ``P[W >= v] <= f(v) + 2 m delta max_{i=1..m} (f(v - i) - f(v)) / i`` with
  ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]`` (for ``delta = 0`` the number of correct
  guesses is stochastically dominated by that binomial).

Confidence bookkeeping (what "confidence" means everywhere here): the returned ``eps_lower`` is
such that, if the mechanism really is (eps, delta)-DP with ``eps < eps_lower``, an outcome at
least this extreme had probability at most ``1 - confidence``.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import stats

__all__ = [
    "clopper_pearson",
    "eps_from_error_rates",
    "eps_lower_from_counts",
    "ThresholdAudit",
    "eps_lower_from_scores",
    "one_run_tail_bound",
    "one_run_eps_lower",
    "OneRunAudit",
    "one_run_eps_lower_from_scores",
]

_EPS_SEARCH_MAX = 50.0


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(
            f"opacus.auditing: confidence must be in (0, 1), got {confidence}; pass e.g. 0.95"
        )


def _check_delta(delta: float) -> None:
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"opacus.auditing: delta must be in [0, 1), got {delta}")


def _check_counts(k: int, n: int, name: str) -> None:
    if n < 0 or k < 0 or k > n or int(k) != k or int(n) != n:
        raise ValueError(f"opacus.auditing: {name} needs integers 0 <= k <= n, got k={k}, n={n}")


def clopper_pearson(
    k: int, n: int, confidence: float = 0.95, alternative: str = "two-sided"
) -> Tuple[float, float]:
    """Exact (Clopper--Pearson 1934) confidence interval for a binomial proportion.

    ``k`` successes out of ``n`` trials. ``alternative="two-sided"`` splits ``1 - confidence``
    between both tails (the interval of ``scipy.stats.binomtest(k, n).proportion_ci``);
    ``"less"`` gives the one-sided interval ``[0, upper]`` and ``"greater"`` ``[lower, 1]``.
    With ``n == 0`` nothing is known and the interval is ``[0, 1]``.

    Example:
        >>> lo, hi = clopper_pearson(3, 100, confidence=0.95)
        >>> round(lo, 4), round(hi, 4)
        (0.0062, 0.0852)
    """
    _check_confidence(confidence)
    _check_counts(k, n, "clopper_pearson")
    if alternative not in ("two-sided", "less", "greater"):
        raise ValueError(
            f"opacus.auditing.clopper_pearson: alternative must be 'two-sided', 'less' or "
            f"'greater', got {alternative!r}"
        )
    if n == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    tail = alpha / 2 if alternative == "two-sided" else alpha
    lower, upper = 0.0, 1.0
    if alternative in ("two-sided", "greater") and k > 0:
        lower = float(stats.beta.ppf(tail, k, n - k + 1))
    if alternative in ("two-sided", "less") and k < n:
        upper = float(stats.beta.ppf(1.0 - tail, k + 1, n - k))
    return lower, upper


def eps_from_error_rates(fpr: float, fnr: float, delta: float = 0.0) -> float:
    """The smallest eps compatible with a test of these error rates under (eps, delta)-DP.

    ``max(log((1 - delta - fnr) / fpr), log((1 - delta - fpr) / fnr), 0)`` (Kairouz et al. 2015,
    Thm 2.1). A rate of 0 with a positive numerator gives ``inf``. Plug in *point* estimates to get
    an estimate, or confidence upper bounds (see :func:`eps_lower_from_counts`) to get a bound.
    """
    _check_delta(delta)
    for name, rate in (("fpr", fpr), ("fnr", fnr)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"opacus.auditing.eps_from_error_rates: {name}={rate} not in [0, 1]")
    best = 0.0
    for num, den in ((1.0 - delta - fnr, fpr), (1.0 - delta - fpr, fnr)):
        if num <= 0.0:
            continue
        best = max(best, math.inf if den == 0.0 else math.log(num / den))
    return best


def eps_lower_from_counts(
    false_positives: int,
    negatives: int,
    false_negatives: int,
    positives: int,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> float:
    """Lower bound on eps from the confusion counts of a membership test.

    ``negatives`` runs without the canary, of which ``false_positives`` were guessed "in";
    ``positives`` runs with the canary, of which ``false_negatives`` were guessed "out". Each rate
    is replaced by its one-sided Clopper--Pearson upper bound at level ``1 - (1 - confidence)/2``
    (Bonferroni over the two rates), so the result holds with probability >= ``confidence``.

    Example (randomized response with eps = 1 answers truthfully w.p. e/(1+e) ~ 0.731):
        >>> round(eps_lower_from_counts(2689, 10000, 2689, 10000, confidence=0.95), 2)
        0.96
    """
    _check_delta(delta)
    _check_confidence(confidence)
    _check_counts(false_positives, negatives, "eps_lower_from_counts (false positives)")
    _check_counts(false_negatives, positives, "eps_lower_from_counts (false negatives)")
    per_rate = 1.0 - (1.0 - confidence) / 2.0
    fpr_hi = clopper_pearson(false_positives, negatives, per_rate, alternative="less")[1]
    fnr_hi = clopper_pearson(false_negatives, positives, per_rate, alternative="less")[1]
    return eps_from_error_rates(fpr_hi, fnr_hi, delta)


@dataclass
class ThresholdAudit:
    """Outcome of :func:`eps_lower_from_scores`.

    ``threshold``: guess "canary in" when ``score >= threshold``; counts are those of the
    evaluation trials; ``method`` says how the threshold choice was paid for.
    """

    eps_lower: float
    threshold: float
    false_positives: int
    negatives: int
    false_negatives: int
    positives: int
    method: str


def _confusion(scores_in: np.ndarray, scores_out: np.ndarray, thresholds):
    """False positives and false negatives of "in iff score >= t" for each threshold t."""
    t = np.asarray(thresholds, dtype=np.float64)
    fp = len(scores_out) - np.searchsorted(np.sort(scores_out), t, side="left")
    fn = np.searchsorted(np.sort(scores_in), t, side="left")
    return fp, fn


def _candidate_thresholds(scores_in: np.ndarray, scores_out: np.ndarray) -> np.ndarray:
    # Midpoints between consecutive distinct scores (a threshold inside a gap generalises to
    # fresh trials better than one on a sample), plus the two trivial tests.
    u = np.unique(np.concatenate([scores_in, scores_out]))
    return np.concatenate([[-np.inf], (u[:-1] + u[1:]) / 2, [np.inf]])


def _cp_upper(k: np.ndarray, n: int, confidence: float) -> np.ndarray:
    """Vectorised one-sided Clopper--Pearson upper bound (``clopper_pearson(..., "less")``)."""
    k = np.asarray(k)
    if n == 0:
        return np.ones(k.shape)
    safe = np.minimum(k, n - 1)
    return np.where(k >= n, 1.0, stats.beta.ppf(confidence, safe + 1, n - safe))


def _eps_lower_many(fp, n_out, fn, n_in, delta, confidence) -> np.ndarray:
    per_rate = 1.0 - (1.0 - confidence) / 2.0
    fpr, fnr = _cp_upper(fp, n_out, per_rate), _cp_upper(fn, n_in, per_rate)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(1 - delta - fnr > 0, np.log((1 - delta - fnr) / fpr), 0.0)
        b = np.where(1 - delta - fpr > 0, np.log((1 - delta - fpr) / fnr), 0.0)
    return np.maximum(np.maximum(a, b), 0.0)


def _best_threshold(scores_in, scores_out, delta, confidence) -> Tuple[float, float]:
    t = _candidate_thresholds(scores_in, scores_out)
    fp, fn = _confusion(scores_in, scores_out, t)
    eps = _eps_lower_many(fp, len(scores_out), fn, len(scores_in), delta, confidence)
    i = int(np.argmax(eps))
    return float(eps[i]), float(t[i])


def eps_lower_from_scores(
    scores_in: Sequence[float],
    scores_out: Sequence[float],
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    method: str = "split",
    seed: Optional[int] = 0,
) -> ThresholdAudit:
    """Lower bound on eps from the scores of runs with (``scores_in``) and without the canary.

    The test guesses "canary in" when ``score >= threshold``. Choosing the threshold that looks
    best on the very data used for the bound would bias the bound upwards, so:

    * ``method="split"`` (default): the trials of each kind are shuffled (``seed``) and halved; the
      threshold maximising the bound on the first half is evaluated on the second half only, so
      the evaluation counts are independent of the choice and the confidence is exact.
    * ``method="bonferroni"``: all trials are used for evaluation; every gap between distinct
      scores gives a candidate threshold; the bound at each candidate is computed at confidence
      ``1 - (1 - confidence) / K`` for ``K`` candidates (union bound), and the best is returned.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> res = eps_lower_from_scores(rng.normal(4, 1, 1000), rng.normal(0, 1, 1000))
        >>> res.eps_lower > 1
        True
    """
    _check_delta(delta)
    _check_confidence(confidence)
    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if np.isnan(s_in).any() or np.isnan(s_out).any():
        raise ValueError("opacus.auditing.eps_lower_from_scores: scores contain NaN")
    if method == "split":
        if len(s_in) < 2 or len(s_out) < 2:
            raise ValueError(
                "opacus.auditing.eps_lower_from_scores(method='split') needs at least 2 scores of "
                f"each kind, got {len(s_in)} in and {len(s_out)} out; run more trials"
            )
        rng = np.random.default_rng(seed)
        s_in, s_out = rng.permutation(s_in), rng.permutation(s_out)
        h_in, h_out = len(s_in) // 2, len(s_out) // 2
        _, t = _best_threshold(s_in[:h_in], s_out[:h_out], delta, confidence)
        ev_in, ev_out = s_in[h_in:], s_out[h_out:]
        fp, fn = (int(c[0]) for c in _confusion(ev_in, ev_out, [t]))
        eps = eps_lower_from_counts(
            fp, len(ev_out), fn, len(ev_in), delta=delta, confidence=confidence
        )
        return ThresholdAudit(eps, t, fp, len(ev_out), fn, len(ev_in), method)
    if method == "bonferroni":
        if len(s_in) < 1 or len(s_out) < 1:
            raise ValueError(
                "opacus.auditing.eps_lower_from_scores needs at least one score of each kind"
            )
        k = len(_candidate_thresholds(s_in, s_out))
        eps, t = _best_threshold(s_in, s_out, delta, 1.0 - (1.0 - confidence) / k)
        fp, fn = (int(c[0]) for c in _confusion(s_in, s_out, [t]))
        return ThresholdAudit(max(eps, 0.0), t, fp, len(s_out), fn, len(s_in), method)
    raise ValueError(
        f"opacus.auditing.eps_lower_from_scores: method must be 'split' or 'bonferroni', "
        f"got {method!r}"
    )


def one_run_tail_bound(
    eps: float, num_guesses: int, num_correct: int, num_canaries: int, delta: float = 0.0
) -> float:
    """Upper bound on ``P[W >= num_correct]`` for an (eps, delta)-DP run (Steinke et al. 2023).

    ``f(v) + 2 m delta max_{i=1..m} (f(v - i) - f(v)) / i`` with
    ``f(v) = P[Binomial(r, e^eps/(1+e^eps)) >= v]``, ``r = num_guesses``, ``m = num_canaries``.
    """
    p = 1.0 / (1.0 + math.exp(-eps))
    v = num_correct
    f_v = float(stats.binom.sf(v - 1, num_guesses, p))
    if delta == 0.0 or num_canaries == 0:
        return f_v
    i = np.arange(1, num_canaries + 1)
    f_shift = stats.binom.sf(v - i - 1, num_guesses, p)
    return f_v + 2.0 * num_canaries * delta * float(np.max((f_shift - f_v) / i))


def one_run_eps_lower(
    num_guesses: int,
    num_correct: int,
    *,
    num_canaries: Optional[int] = None,
    delta: float = 0.0,
    confidence: float = 0.95,
    eps_step: float = 0.01,
) -> float:
    """Steinke--Nasr--Jagielski (2023) one-run lower bound on eps.

    The largest eps such that, for every eps' in ``[0, eps]``, the tail bound of
    :func:`one_run_tail_bound` at ``num_correct`` stays <= ``1 - confidence``: if the run were
    eps'-DP with ``eps' < eps_lower``, seeing ``num_correct`` or more correct guesses would have
    had probability at most ``1 - confidence``. ``num_canaries`` (``m``, default ``num_guesses``)
    only matters when ``delta > 0``. For ``delta = 0`` the tail is increasing in eps and the
    crossing is found by bisection; for ``delta > 0`` a grid of step ``eps_step`` is scanned from 0
    and the last grid point before the first crossing is returned (conservative by < eps_step).

    Example:
        >>> round(one_run_eps_lower(1000, 731), 2)  # randomized response at eps = 1
        0.88
    """
    _check_confidence(confidence)
    _check_delta(delta)
    _check_counts(num_correct, num_guesses, "one_run_eps_lower (correct guesses)")
    m = num_guesses if num_canaries is None else num_canaries
    if m < num_guesses:
        raise ValueError(
            f"opacus.auditing.one_run_eps_lower: num_canaries={m} < num_guesses={num_guesses}; "
            "each guess is about a distinct canary"
        )
    alpha = 1.0 - confidence

    def ok(e: float) -> bool:
        return one_run_tail_bound(e, num_guesses, num_correct, m, delta) <= alpha

    if num_guesses == 0 or not ok(0.0):
        return 0.0
    if delta > 0.0:
        e = 0.0
        while e + eps_step <= _EPS_SEARCH_MAX and ok(e + eps_step):
            e += eps_step
        return e
    lo, hi = 0.0, _EPS_SEARCH_MAX
    if ok(hi):
        return hi
    while hi - lo > 1e-7:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@dataclass
class OneRunAudit:
    """Outcome of :func:`one_run_eps_lower_from_scores`."""

    eps_lower: float
    num_canaries: int
    num_guesses: int
    num_correct: int


def one_run_eps_lower_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    k_pos: int,
    k_neg: int = 0,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> OneRunAudit:
    """One-run audit: guess the ``k_pos`` highest-scoring canaries "in", the ``k_neg`` lowest "out".

    ``included[i]`` says whether canary ``i`` was (independently, with probability 1/2) inserted.
    ``k_pos``/``k_neg`` must be fixed before looking at the scores (choosing them on the outcome
    voids the confidence; if several are tried, divide ``1 - confidence`` by their number).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    inc = np.asarray(included, dtype=bool).ravel()
    if s.shape != inc.shape:
        raise ValueError(
            f"opacus.auditing.one_run_eps_lower_from_scores: {len(s)} scores but {len(inc)} "
            "inclusion flags; pass one flag per canary"
        )
    m = len(s)
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(
            f"opacus.auditing.one_run_eps_lower_from_scores: need 0 <= k_pos + k_neg <= "
            f"{m} canaries, got k_pos={k_pos}, k_neg={k_neg}"
        )
    order = np.argsort(s, kind="stable")
    guessed_out = order[:k_neg]
    guessed_in = order[m - k_pos :] if k_pos > 0 else order[:0]
    correct = int(inc[guessed_in].sum()) + int((~inc[guessed_out]).sum())
    r = k_pos + k_neg
    eps = one_run_eps_lower(r, correct, num_canaries=m, delta=delta, confidence=confidence)
    return OneRunAudit(eps, m, r, correct)

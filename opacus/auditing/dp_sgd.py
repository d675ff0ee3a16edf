"""White-box audit of DP-SGD as run by ``PrivacyEngine`` (Nasr et al. 2021, 2023; Steinke 2023).

The experiment: wrap the model in :class:`~opacus.auditing.canary.CanaryModule`, make it private
with ``PrivacyEngine().make_private``, train a few steps with plain SGD, and in every step insert
each *included* canary's Dirac gradient into the per-sample gradients with probability equal to
the loader's sample rate (the canary is a dataset member, Poisson-sampled like every other one, so
the accountant's subsampling amplification applies to it). The score of canary ``k`` is the total
movement of its coordinate, ``(theta_0 - theta_T)[k] / lr``: the sum of the noisy canary-coordinate
gradients over the steps.

Two analyses of the same kind of experiment:

* :func:`audit_dp_sgd`: the classical audit. Each (run, canary) cell is a trial, included with the
  canary or not (balanced random assignment); the eps lower bound comes from the best-threshold
  membership test with Clopper--Pearson rates
  (:func:`~opacus.auditing.bounds.eps_lower_from_scores`).
  With ``canaries_per_run=1`` every trial is a separate training run (the textbook audit, valid
  for any implementation). With ``canaries_per_run=K > 1`` a run hosts ``K`` trials on ``K``
  coordinates; they are independent when the implementation is correct (each canary is its own
  clipped sample, the noise is i.i.d. per coordinate, real samples have zero gradient there), so a
  correct implementation still passes at the stated confidence, and trials become K times cheaper.
* :func:`audit_dp_sgd_one_run`: Steinke, Nasr, Jagielski (2023): one run, ``m`` canaries each
  included independently with probability 1/2; guess the top-``k_pos`` scores "in" and the
  bottom-``k_neg`` "out"; their bound is valid without any independence assumption.

The bounds are lower bounds on the eps of *one canary's* privacy, which the accountant's eps
(computed for any single sample over the same steps and sample rate) must exceed if the library
is correct. Use the ``"prv"`` accountant (tight) for the claim; ``"rdp"`` over-reports eps and
makes the audit weaker.
"""

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from opacus.auditing.bounds import (
    OneRunAudit,
    ThresholdAudit,
    eps_lower_from_scores,
    one_run_eps_lower_from_scores,
)
from opacus.auditing.canary import CanaryModule, dirac_canary_gradients, insert_canary_gradients
from opacus.privacy_engine import PrivacyEngine

__all__ = [
    "AuditResult",
    "run_canary_experiment",
    "audit_dp_sgd",
    "audit_dp_sgd_one_run",
    "audit_dp_sgd_input_canary",
]


@dataclass
class AuditResult:
    """An audit's verdict: ``eps_lower`` (holds with probability ``confidence``) vs the claim.

    ``trials``: number of membership trials (canary cells); ``runs``: training runs performed;
    ``method``: ``"threshold-split"``, ``"threshold-bonferroni"`` or ``"one-run"``.
    ``violation`` is True when ``eps_lower > eps_claimed``, i.e. the implementation leaks more than
    its accountant claims (at the stated confidence).
    """

    eps_lower: float
    eps_claimed: float
    confidence: float
    trials: int
    delta: float = 0.0
    runs: int = 0
    method: str = ""
    detail: Union[ThresholdAudit, OneRunAudit, None] = field(default=None, repr=False)
    scores: Optional[np.ndarray] = field(default=None, repr=False)
    included: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def violation(self) -> bool:
        """True when ``eps_lower > eps_claimed``: measured leakage exceeds the claimed epsilon."""
        return self.eps_lower > self.eps_claimed

    def summary(self) -> str:
        """One-line human-readable report of the audit, ending in ``VIOLATION`` or ``ok``.

        Example: ``eps_lower=0.412 eps_claimed=2.000 delta=1e-05 confidence=0.95 trials=1000
        runs=1 method=one-run: ok``.
        """
        verdict = "VIOLATION" if self.violation else "ok"
        return (
            f"eps_lower={self.eps_lower:.3f} eps_claimed={self.eps_claimed:.3f} "
            f"delta={self.delta:g} confidence={self.confidence:g} trials={self.trials} "
            f"runs={self.runs} method={self.method}: {verdict}"
        )


def _as_dataset(data) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and all(torch.is_tensor(t) for t in data):
        return TensorDataset(*data)
    raise TypeError(
        "opacus.auditing: `data` must be a torch Dataset or a tuple of tensors (inputs..., "
        f"target), got {type(data).__name__}"
    )


def _check_engine_kwargs(privacy_engine_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    kw = dict(privacy_engine_kwargs)
    for required in ("noise_multiplier", "max_grad_norm"):
        if required not in kw:
            raise ValueError(
                f"opacus.auditing: privacy_engine_kwargs needs {required!r} (passed to "
                "PrivacyEngine.make_private)"
            )
    for reserved in ("module", "optimizer", "data_loader", "criterion"):
        if reserved in kw:
            raise ValueError(
                f"opacus.auditing: do not pass {reserved!r} in privacy_engine_kwargs; the audit "
                "builds it (use model_fn, data, criterion, lr, batch_size)"
            )
    if not isinstance(kw["max_grad_norm"], (int, float)):
        raise ValueError(
            "opacus.auditing: only a scalar max_grad_norm (flat or adaptive clipping) is "
            "supported; per-layer clip bounds would need one for the audit's canary parameter"
        )
    if kw.get("grad_sample_mode", "hooks") == "ghost":
        raise ValueError(
            "opacus.auditing: grad_sample_mode='ghost' never materialises per-sample gradients, "
            "so gradient canaries cannot be inserted; audit with 'hooks' (same optimizer maths)"
        )
    return kw


def _default_engine_factory(accountant: str) -> Callable[[], Any]:
    return lambda: PrivacyEngine(accountant=accountant)


@contextlib.contextmanager
def _audit_runtime():
    # The audited models are tiny: intra-op threads only add synchronisation (measured 60x slower
    # per step with 2 threads on a loaded 2-core machine), so run single-threaded and restore.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _make_private(factory, model, criterion, dataset, batch_size, lr, kw):
    """``(engine, module, dp_optimizer, dp_loader)`` for one audited SGD run (ghost mode excluded
    by ``_check_engine_kwargs``, so ``make_private`` returns a triple)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=batch_size)
    engine = factory()
    made = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, **kw
    )
    return engine, made[0], made[1], made[-1]


def _batches(loader, steps: int):
    """``steps`` batches of ``loader``, starting a new epoch whenever it runs out."""
    batches = iter(loader)
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        yield batch


def _backward(module, dp_optimizer, criterion, batch):
    *inputs, target = batch
    dp_optimizer.zero_grad()
    criterion(module(*inputs), target).backward()


def run_canary_experiment(
    model_fn: Callable[[], nn.Module],
    data,
    privacy_engine_kwargs: Dict[str, Any],
    included: np.ndarray,
    *,
    steps: int = 1,
    batch_size: Optional[int] = None,
    lr: float = 1.0,
    criterion: Optional[nn.Module] = None,
    canary_norm: Optional[float] = None,
    delta: float = 1e-5,
    accountant: str = "prv",
    privacy_engine_factory: Optional[Callable[[], Any]] = None,
    seed: int = 0,
) -> Tuple[np.ndarray, float]:
    """Train ``included.shape[0]`` private runs with ``included.shape[1]`` canaries each.

    ``included[r, k]`` says whether canary ``k`` is a member of run ``r``'s dataset. Returns
    ``(scores, eps_claimed)``: ``scores[r, k]`` is canary ``k``'s coordinate movement divided by
    ``lr``, and ``eps_claimed`` is the first run's ``privacy_engine.get_epsilon(delta)`` (every
    run has the same steps, noise and sample rate). ``privacy_engine_factory()`` must return an
    object with ``make_private`` and ``get_epsilon`` (default ``PrivacyEngine(accountant=...)``);
    pass a subclass to audit a modified engine. ``canary_norm`` defaults to ``10 *
    max_grad_norm`` so that a missing clip shows up as a 10x larger signal.
    """
    kw = _check_engine_kwargs(privacy_engine_kwargs)
    included = np.asarray(included, dtype=bool)
    if included.ndim != 2 or included.shape[1] < 1:
        raise ValueError(
            "opacus.auditing.run_canary_experiment: `included` must be (runs, canaries) bools, "
            f"got shape {included.shape}"
        )
    if steps < 1 or lr <= 0:
        raise ValueError(f"opacus.auditing: need steps >= 1 and lr > 0, got {steps}, {lr}")
    dataset = _as_dataset(data)
    batch_size = len(dataset) if batch_size is None else batch_size
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    canary_norm = 10.0 * float(kw["max_grad_norm"]) if canary_norm is None else canary_norm
    factory = privacy_engine_factory or _default_engine_factory(accountant)
    with _audit_runtime():
        return _run_experiment(
            model_fn,
            dataset,
            kw,
            included,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            criterion=criterion,
            canary_norm=canary_norm,
            delta=delta,
            factory=factory,
            seed=seed,
        )


def _run_experiment(
    model_fn,
    dataset,
    kw,
    included,
    *,
    steps,
    batch_size,
    lr,
    criterion,
    canary_norm,
    delta,
    factory,
    seed,
) -> Tuple[np.ndarray, float]:
    batch_dim = 0 if kw.get("batch_first", True) else 1
    runs, num_canaries = included.shape
    scores = np.zeros((runs, num_canaries))
    eps_claimed = math.nan
    gen = torch.Generator().manual_seed(seed)
    for r in range(runs):
        torch.manual_seed(seed * 1_000_003 + r)
        model = CanaryModule(model_fn(), num_canaries, batch_dim=batch_dim)
        engine, module, dp_optimizer, dp_loader = _make_private(
            factory, model, criterion, dataset, batch_size, lr, kw
        )
        sample_rate = getattr(dp_loader, "sample_rate", None) or 1.0 / len(dp_loader)
        canary = model.canary.weight
        start = canary.detach().clone()
        member = torch.as_tensor(included[r])
        for batch in _batches(dp_loader, steps):
            _backward(module, dp_optimizer, criterion, batch)
            in_batch = member & (torch.rand(num_canaries, generator=gen) < sample_rate)
            rows = dirac_canary_gradients(in_batch, canary_norm, dtype=canary.dtype)
            insert_canary_gradients(dp_optimizer.params, canary, rows, generator=gen)
            dp_optimizer.step()
        scores[r] = ((start - canary.detach()).flatten() / lr).double().numpy()
        if r == 0:
            eps_claimed = float(engine.get_epsilon(delta))
    return scores, eps_claimed


def _balanced_assignment(runs: int, per_run: int, rng: np.random.Generator) -> np.ndarray:
    cells = runs * per_run
    flags = np.zeros(cells, dtype=bool)
    flags[: cells // 2] = True
    return rng.permutation(flags).reshape(runs, per_run)


def audit_dp_sgd(
    model_fn: Callable[[], nn.Module],
    data,
    privacy_engine_kwargs: Dict[str, Any],
    *,
    trials: int = 200,
    canaries_per_run: int = 1,
    steps: int = 1,
    batch_size: Optional[int] = None,
    lr: float = 1.0,
    criterion: Optional[nn.Module] = None,
    canary_norm: Optional[float] = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
    threshold_method: str = "split",
    accountant: str = "prv",
    privacy_engine_factory: Optional[Callable[[], Any]] = None,
    seed: int = 0,
) -> AuditResult:
    """Classical canary-gradient audit of ``PrivacyEngine`` DP-SGD: eps_lower vs eps_claimed.

    ``trials`` membership trials (half with the canary) spread over
    ``ceil(trials / canaries_per_run)`` training runs of ``steps`` steps each (see the module
    docstring for the validity of ``canaries_per_run > 1``). ``threshold_method`` is
    ``"split"`` (select the threshold on half the trials, evaluate on the other half) or
    ``"bonferroni"``; see :func:`~opacus.auditing.bounds.eps_lower_from_scores`. Other arguments as
    in :func:`run_canary_experiment`.

    Example:
        >>> import torch
        >>> from opacus.auditing import audit_dp_sgd
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> res = audit_dp_sgd(lambda: torch.nn.Linear(4, 2), (x, y),
        ...                    dict(noise_multiplier=2.0, max_grad_norm=1.0),
        ...                    trials=400, canaries_per_run=100)  # doctest: +SKIP
        >>> res.eps_lower <= res.eps_claimed  # doctest: +SKIP
        True
    """
    if trials < 4 or canaries_per_run < 1:
        raise ValueError(
            f"opacus.auditing.audit_dp_sgd: need trials >= 4 and canaries_per_run >= 1, got "
            f"{trials}, {canaries_per_run}"
        )
    runs = math.ceil(trials / canaries_per_run)
    rng = np.random.default_rng(seed)
    included = _balanced_assignment(runs, canaries_per_run, rng)
    scores, eps_claimed = run_canary_experiment(
        model_fn,
        data,
        privacy_engine_kwargs,
        included,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        criterion=criterion,
        canary_norm=canary_norm,
        delta=delta,
        accountant=accountant,
        privacy_engine_factory=privacy_engine_factory,
        seed=seed,
    )
    detail = eps_lower_from_scores(
        scores[included],
        scores[~included],
        delta=delta,
        confidence=confidence,
        method=threshold_method,
        seed=seed,
    )
    return AuditResult(
        eps_lower=detail.eps_lower,
        eps_claimed=eps_claimed,
        confidence=confidence,
        trials=included.size,
        delta=delta,
        runs=runs,
        method=f"threshold-{threshold_method}",
        detail=detail,
        scores=scores,
        included=included,
    )


def audit_dp_sgd_one_run(
    model_fn: Callable[[], nn.Module],
    data,
    privacy_engine_kwargs: Dict[str, Any],
    *,
    num_canaries: int = 1000,
    k_pos: Optional[int] = None,
    k_neg: Optional[int] = None,
    steps: int = 1,
    batch_size: Optional[int] = None,
    lr: float = 1.0,
    criterion: Optional[nn.Module] = None,
    canary_norm: Optional[float] = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "prv",
    privacy_engine_factory: Optional[Callable[[], Any]] = None,
    seed: int = 0,
) -> AuditResult:
    """One-training-run audit (Steinke, Nasr, Jagielski 2023) with ``num_canaries`` canaries.

    Each canary is a member with probability 1/2 independently; after training, the ``k_pos``
    highest scores are guessed members and the ``k_neg`` lowest non-members (both default to
    ``num_canaries // 10``; fix them before seeing the scores). The bound uses the paper's
    (eps, delta) tail (:func:`~opacus.auditing.bounds.one_run_eps_lower`) with this ``delta``.
    """
    if num_canaries < 2:
        raise ValueError(
            f"opacus.auditing.audit_dp_sgd_one_run: need num_canaries >= 2, got {num_canaries}"
        )
    k_pos = num_canaries // 10 if k_pos is None else k_pos
    k_neg = num_canaries // 10 if k_neg is None else k_neg
    rng = np.random.default_rng(seed)
    included = rng.random((1, num_canaries)) < 0.5
    scores, eps_claimed = run_canary_experiment(
        model_fn,
        data,
        privacy_engine_kwargs,
        included,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        criterion=criterion,
        canary_norm=canary_norm,
        delta=delta,
        accountant=accountant,
        privacy_engine_factory=privacy_engine_factory,
        seed=seed,
    )
    detail = one_run_eps_lower_from_scores(
        scores[0], included[0], k_pos=k_pos, k_neg=k_neg, delta=delta, confidence=confidence
    )
    return AuditResult(
        eps_lower=detail.eps_lower,
        eps_claimed=eps_claimed,
        confidence=confidence,
        trials=num_canaries,
        delta=delta,
        runs=1,
        method="one-run",
        detail=detail,
        scores=scores,
        included=included,
    )


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def audit_dp_sgd_input_canary(
    model_fn: Callable[[], nn.Module],
    data,
    canary_sample: Tuple[torch.Tensor, ...],
    privacy_engine_kwargs: Dict[str, Any],
    *,
    trials: int = 200,
    steps: int = 1,
    batch_size: Optional[int] = None,
    lr: float = 1.0,
    criterion: Optional[nn.Module] = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
    threshold_method: str = "split",
    accountant: str = "prv",
    privacy_engine_factory: Optional[Callable[[], Any]] = None,
    seed: int = 0,
) -> AuditResult:
    """Audit with a crafted *input* canary: covers the per-sample gradient computation too.

    The gradient-canary audits enter after ``GradSampleModule``, so they cannot see a grad
    sampler that mixes samples (e.g. a layer fed seq-first activations). Here the canary is a real
    sample ``canary_sample = (*inputs, target)`` (each without the batch dimension) appended to
    ``data`` in half of the ``trials`` runs, so its gradient goes through the hooks, the clipping
    and the noise. Every run starts from the same initial model (``model_fn`` is called under a
    fixed seed; the noise seed differs per run), and the score is the model's movement along the
    canary's own initial gradient direction ``u``: ``<theta_0 - theta_T, u> / lr``. A canary
    with a large gradient gives the sharpest test: e.g. a large input on a feature the data never
    uses, labelled with the class the initial model finds least likely (with a likely label the
    softmax saturates and the gradient vanishes). ``batch_size`` defaults to ``len(data) + 1``,
    so both kinds of runs use full batches (sample rate 1); ``eps_claimed`` comes from a run with
    the canary.
    """
    kw = _check_engine_kwargs(privacy_engine_kwargs)
    if trials < 4:
        raise ValueError(
            f"opacus.auditing.audit_dp_sgd_input_canary: need trials >= 4, got {trials}"
        )
    dataset = _as_dataset(data)
    canary_ds = TensorDataset(*(torch.as_tensor(t).unsqueeze(0) for t in canary_sample))
    batch_size = len(dataset) + 1 if batch_size is None else batch_size
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    factory = privacy_engine_factory or _default_engine_factory(accountant)
    rng = np.random.default_rng(seed)
    included = _balanced_assignment(trials, 1, rng)[:, 0]

    torch.manual_seed(seed)
    reference = model_fn()
    *c_inputs, c_target = canary_ds[:1]
    criterion(reference(*c_inputs), c_target).backward()
    u = torch.cat([p.grad.flatten() for p in reference.parameters() if p.requires_grad])
    if torch.linalg.vector_norm(u) == 0:
        raise ValueError(
            "opacus.auditing.audit_dp_sgd_input_canary: the canary's gradient at the initial model "
            "is zero, so it cannot move the model; pick a canary with a non-zero loss gradient"
        )
    u = u / torch.linalg.vector_norm(u)

    scores = np.zeros(trials)
    eps_claimed = math.nan
    with _audit_runtime():
        for r in range(trials):
            torch.manual_seed(seed)
            model = model_fn()
            theta0 = _flat_params(model)
            torch.manual_seed(seed * 1_000_003 + r + 1)
            ds = ConcatDataset([dataset, canary_ds]) if included[r] else dataset
            engine, module, dp_optimizer, dp_loader = _make_private(
                factory, model, criterion, ds, batch_size, lr, kw
            )
            for batch in _batches(dp_loader, steps):
                _backward(module, dp_optimizer, criterion, batch)
                dp_optimizer.step()
            scores[r] = float(torch.dot(theta0 - _flat_params(model), u)) / lr
            if included[r] and math.isnan(eps_claimed):
                eps_claimed = float(engine.get_epsilon(delta))
    detail = eps_lower_from_scores(
        scores[included],
        scores[~included],
        delta=delta,
        confidence=confidence,
        method=threshold_method,
        seed=seed,
    )
    return AuditResult(
        eps_lower=detail.eps_lower,
        eps_claimed=eps_claimed,
        confidence=confidence,
        trials=trials,
        delta=delta,
        runs=trials,
        method=f"input-canary-{threshold_method}",
        detail=detail,
        scores=scores[:, None],
        included=included[:, None],
    )

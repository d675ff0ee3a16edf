"""Correlated noise across steps: banded matrix factorization (banded MF) of the prefix sums.

DP-SGD releases ``x_t + z_t`` at every step ``t`` (``x_t`` the clipped gradient sum, ``z_t``
i.i.d. Gaussian).  SGD only uses the *prefix sums* of the released stream, and the noise in them
(``sum_{s <= t} z_s``) grows like ``sqrt(t)``.  A matrix-factorization mechanism (Denisov et al.
2022; Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization") writes the prefix-sum
workload as ``A = B C`` and releases ``C x + z`` privately; the optimizer then sees
``x + C^{-1} z``, i.e. step ``t`` adds ``w_t`` with ``C w = z``.

Here ``C`` is lower-triangular, Toeplitz and **b-banded**: ``c_0 = 1``, ``c_1 ... c_{b-1}``, zero
beyond.  Streaming: ``w_t = z_t - sum_{j=1}^{b-1} c_j w_{t-j}`` with
``z_t ~ N(0, (sigma R ||C||_col)^2 I)`` (``R`` the clipping norm, ``||C||_col = sqrt(sum_j c_j^2)``
the column norm of the banded Toeplitz ``C``).  Only the last ``b - 1`` noise vectors are kept:
``b - 1`` model-sized buffers.  ``b = 1`` is DP-SGD, bit for bit.

Privacy (Choquette-Choo et al. 2023, amplification for b-banded ``C``): if the data set is split
once into ``b`` disjoint groups and step ``t`` Poisson-samples (rate ``q``) from group
``t mod b`` only (``opacus.utils.uniform_sampler.CyclicPoissonSampler``), the run has the privacy
of DP-SGD with ``ceil(T / b)`` steps, sampling rate ``q`` and noise multiplier ``sigma``.  The
noise multiplier and the clipping norm must stay constant during a run with ``b > 1`` (the
reduction assumes it); the mechanism refuses a change of the noise std.

Coefficients:

* :func:`banded_sqrt_coefficients` (default): ``c_j = binom(2j, j) / 4^j`` for ``j < b``, the
  power series of ``(1 - x)^{-1/2}`` truncated (Kalinin and Lampert 2024).
* :func:`optimized_coefficients`: for a horizon ``T`` and ``b``, minimise the total variance of
  the prefix-sum noise ``sum_{t < T} Var(sum_{s <= t} w_s)`` at equal privacy, i.e.
  ``||C||_col^2 * ||A C^{-1}||_F^2``.  ``C^{-1}`` is lower-triangular Toeplitz with coefficients
  ``d = 1 / c(x)`` (``d_0 = 1``, ``d_k = -sum_j c_j d_{k-j}``) and ``A C^{-1}`` has coefficients
  ``e_k = d_0 + ... + d_k``, so the objective is ``(sum_j c_j^2) * sum_{k<T} (T - k) e_k^2``,
  evaluated in ``O(T b)``.  It is scale invariant in ``c`` (hence ``c_0 = 1`` loses nothing).
  It is smooth but, in these Toeplitz coordinates, not convex in general, so it is solved by
  L-BFGS (scipy, exact gradients by torch autograd in float64) *started from the banded square
  root*; the result is kept only if its objective is not larger, so it is never worse than the
  default on this objective.
"""

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from opacus.optimizers.noise import with_gaussian_noise

__all__ = [
    "BandedMatrixFactorizationNoise",
    "banded_sqrt_coefficients",
    "optimized_coefficients",
    "prefix_sum_error",
]

_STD_RTOL = 1e-12


def _check_bands(bands, owner: str) -> int:
    if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
        raise ValueError(f"{owner}: bands must be an integer >= 1, got {bands!r}")
    return bands


def banded_sqrt_coefficients(bands: int) -> List[float]:
    """``[binom(2j, j) / 4^j for j < bands]``: the banded square root of the prefix-sum matrix."""
    bands = _check_bands(bands, "banded_sqrt_coefficients")
    coeffs = [1.0]
    for j in range(1, bands):
        # binom(2j, j) / 4^j = prod_{i<=j} (2i - 1) / (2i)
        coeffs.append(coeffs[-1] * (2 * j - 1) / (2 * j))
    return coeffs


def _inverse_series(c: torch.Tensor, horizon: int) -> torch.Tensor:
    """The first ``horizon`` coefficients of ``1 / c(x)`` (``c_0 = 1``)."""
    d: List[torch.Tensor] = [c.new_ones(())]
    b = c.numel()
    for k in range(1, horizon):
        m = min(k, b - 1)
        if m == 0:
            d.append(c.new_zeros(()))
            continue
        past = torch.stack(d[k - m : k][::-1])  # d_{k-1}, ..., d_{k-m}
        d.append(-(c[1 : m + 1] * past).sum())
    return torch.stack(d)


def _objective(c: torch.Tensor, horizon: int) -> torch.Tensor:
    e = torch.cumsum(_inverse_series(c, horizon), 0)
    weights = torch.arange(horizon, 0, -1, dtype=c.dtype)
    return (c * c).sum() * (weights * e * e).sum()


def prefix_sum_error(coefficients: Sequence[float], horizon: int) -> float:
    """``sum_{t < horizon} Var(sum_{s <= t} w_s)`` per coordinate for ``sigma R = 1``:
    ``||C||_col^2 * ||A C^{-1}||_F^2`` (module docstring). DP-SGD (``[1.0]``) gives
    ``horizon (horizon + 1) / 2``."""
    c = _validated_coefficients(coefficients, "prefix_sum_error")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"prefix_sum_error: horizon must be an integer >= 1, got {horizon!r}")
    return float(_objective(torch.tensor(c, dtype=torch.float64), horizon))


def optimized_coefficients(bands: int, horizon: int, *, max_iter: int = 200) -> List[float]:
    """Coefficients ``c_0 = 1, ..., c_{b-1}`` minimising ``prefix_sum_error`` over ``horizon``
    steps, by L-BFGS from the banded square root (module docstring); never worse than it."""
    owner = "optimized_coefficients"
    bands = _check_bands(bands, owner)
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"{owner}: horizon must be an integer >= 1 (steps), got {horizon!r}")
    start = banded_sqrt_coefficients(bands)
    if bands == 1:
        return start
    import numpy as np
    from scipy.optimize import minimize

    def fun(free: "np.ndarray"):
        x = torch.tensor(free, dtype=torch.float64, requires_grad=True)
        c = torch.cat([x.new_ones(1), x])
        value = _objective(c, horizon)
        if not torch.isfinite(value):
            return float("inf"), np.zeros_like(free)
        (grad,) = torch.autograd.grad(value, x)
        return float(value.detach()), grad.numpy()

    x0 = np.array(start[1:])
    f0 = fun(x0)[0]
    result = minimize(fun, x0, jac=True, method="L-BFGS-B", options=dict(maxiter=max_iter))
    if np.all(np.isfinite(result.x)) and float(result.fun) <= f0:
        return [1.0] + [float(v) for v in result.x]
    return start


def _validated_coefficients(coefficients, owner: str) -> List[float]:
    try:
        coeffs = [float(c) for c in coefficients]
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: coefficients must be a sequence of real numbers c_0 = 1, c_1, ..., "
            f"c_(b-1), got {coefficients!r}"
        ) from None
    if not coeffs or coeffs[0] != 1.0 or not all(math.isfinite(c) for c in coeffs):
        raise ValueError(
            f"{owner}: coefficients must be finite with c_0 == 1 (C's diagonal), got {coeffs}"
        )
    return coeffs


class BandedMatrixFactorizationNoise:
    """Streaming correlated noise ``w_t = z_t - sum_{j=1}^{b-1} c_j w_{t-j}`` (module docstring).

    ``z_t ~ N(0, (std * column_norm)^2)`` where ``std = noise_multiplier * max_grad_norm`` is what
    the optimizer asks for; ``column_norm = sqrt(sum_j c_j^2)``.  ``DPOptimizer.add_noise`` uses
    :meth:`with_noise` instead of ``with_gaussian_noise`` when the optimizer's
    ``noise_mechanism`` attribute holds one.  With ``b = 1`` it *is* ``with_gaussian_noise``.

    State: ``steps`` (noise draws so far), the last ``b - 1`` noise vectors and the std in use;
    :meth:`state_dict` / :meth:`load_state_dict` restore the stream exactly (together with the
    noise generator's state).  Memory: ``b - 1`` copies of the model's parameters.

    Args:
        coefficients: ``c_0 = 1, c_1, ..., c_{b-1}`` (default: the banded square root for
            ``bands``).
        bands: ``b``, when ``coefficients`` is not given.
    """

    def __init__(self, coefficients: Optional[Sequence[float]] = None, *, bands: int = None):
        owner = type(self).__name__
        if coefficients is None:
            if bands is None:
                raise ValueError(f"{owner}: give coefficients or bands")
            coefficients = banded_sqrt_coefficients(_check_bands(bands, owner))
        self.coefficients: Tuple[float, ...] = tuple(_validated_coefficients(coefficients, owner))
        if bands is not None and _check_bands(bands, owner) != len(self.coefficients):
            raise ValueError(
                f"{owner}: bands={bands} but {len(self.coefficients)} coefficients were given"
            )
        self.steps = 0
        self._history: List[List[torch.Tensor]] = []  # history[j - 1] = w_{t-j}
        self._std: Optional[float] = None

    @classmethod
    def banded_sqrt(cls, bands: int) -> "BandedMatrixFactorizationNoise":
        """The default: banded square-root coefficients."""
        return cls(banded_sqrt_coefficients(bands))

    @classmethod
    def optimized(cls, bands: int, horizon: int) -> "BandedMatrixFactorizationNoise":
        """Coefficients optimised for ``horizon`` steps (:func:`optimized_coefficients`)."""
        return cls(optimized_coefficients(bands, horizon))

    @property
    def bands(self) -> int:
        """``b``: the number of coefficients (bands of ``C``)."""
        return len(self.coefficients)

    @property
    def column_norm(self) -> float:
        """``||C||_col = sqrt(sum_j c_j^2)``: the multiplier of the i.i.d. noise ``z``."""
        return math.sqrt(sum(c * c for c in self.coefficients))

    def _check_std(self, std: float) -> None:
        if self.bands == 1:
            return
        if self._std is None:
            self._std = float(std)
        elif not math.isclose(float(std), self._std, rel_tol=_STD_RTOL, abs_tol=0.0):
            raise ValueError(
                f"{type(self).__name__}: the noise std (noise_multiplier * max_grad_norm) changed "
                f"from {self._std} to {std} during a run with bands={self.bands}: the "
                "amplification reduction to DP-SGD assumes a constant noise multiplier and "
                "clipping norm. Do not use noise or clipping schedulers with banded MF."
            )

    def _check_shapes(self, tensors: Sequence[torch.Tensor]) -> None:
        if not self._history:
            return
        last = self._history[0]
        if len(last) != len(tensors) or any(
            a.shape != b.shape or a.dtype != b.dtype or a.device != b.device
            for a, b in zip(last, tensors)
        ):
            raise ValueError(
                f"{type(self).__name__}: the parameters changed (number, shapes, dtypes or "
                "devices) since the last step; the stored noise no longer matches them. Use one "
                "mechanism per optimizer (reset() to start a new stream)."
            )

    def with_noise(
        self,
        std: float,
        tensors: Sequence[torch.Tensor],
        *,
        generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
    ) -> Iterator[Tuple[int, torch.Tensor]]:
        """Yield ``(i, tensors[i] + w_t[i])`` for every ``i`` as new tensors; advance the stream.

        Same contract as ``opacus.optimizers.noise.with_gaussian_noise`` (which it calls to draw
        ``z_t``, with its generator and secure-mode handling).
        """
        if self.bands == 1:
            self.steps += 1
            yield from with_gaussian_noise(
                std, tensors, generator=generator, secure_mode=secure_mode
            )
            return
        tensors = list(tensors)
        self._check_std(std)
        self._check_shapes(tensors)
        # -sum_j c_j w_{t-j}, then + z_t drawn on top of it: w_t = z_t - sum_j c_j w_{t-j}.
        corrections = []
        for i, t in enumerate(tensors):
            acc = torch.zeros_like(t)
            for j, past in enumerate(self._history, start=1):
                acc.sub_(past[i], alpha=self.coefficients[j])
            corrections.append(acc)
        noise: List[Optional[torch.Tensor]] = [None] * len(tensors)
        for i, w in with_gaussian_noise(
            std * self.column_norm, corrections, generator=generator, secure_mode=secure_mode
        ):
            noise[i] = w
        self._history.insert(0, noise)
        del self._history[self.bands - 1 :]
        self.steps += 1
        for i, t in enumerate(tensors):
            yield i, t + noise[i]

    def reset(self) -> None:
        """Start a new stream (forget the stored noise, the step count and the std)."""
        self.steps = 0
        self._history = []
        self._std = None

    def state_dict(self) -> Dict:
        """Coefficients, step count, std and the stored noise (cloned)."""
        return {
            "coefficients": list(self.coefficients),
            "steps": self.steps,
            "std": self._std,
            "history": [[w.detach().clone() for w in step] for step in self._history],
        }

    def load_state_dict(self, state_dict: Dict) -> None:
        """Restore :meth:`state_dict` output; the coefficients must match this mechanism's."""
        coeffs = tuple(float(c) for c in state_dict["coefficients"])
        if coeffs != self.coefficients:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the checkpoint's coefficients {coeffs} "
                f"differ from this mechanism's {self.coefficients}; build the mechanism with the "
                "same bands/coefficients before loading"
            )
        self.steps = int(state_dict["steps"])
        self._std = state_dict["std"]
        self._history = [[w.detach().clone() for w in step] for step in state_dict["history"]]

    def __repr__(self) -> str:
        coeffs = ", ".join(f"{c:.4g}" for c in self.coefficients)
        return f"{type(self).__name__}(bands={self.bands}, coefficients=[{coeffs}])"

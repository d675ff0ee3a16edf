"""Base class of the privacy accountants.

An accountant records privacy *events*, (noise_multiplier, sample_rate, num_steps), in
``history`` and turns them into an epsilon on demand; it never touches tensors (as in Google's
``dp_accounting``), so this module imports neither torch nor the optimizers.
"""

import abc
import copy
import importlib
import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, TypeVar

if TYPE_CHECKING:  # pragma: no cover - typing only; the optimizer pulls in torch
    from opacus.optimizers.optimizer import DPOptimizer

T_state_dict = TypeVar("T_state_dict", bound=Dict[str, Any])

__all__ = ["IAccountant", "DPOptimizer"]


def __getattr__(name: str):
    # ``DPOptimizer`` is re-exported (interface of opacus 1.6) but imported only when asked for.
    if name == "DPOptimizer":
        return importlib.import_module("opacus.optimizers.optimizer").DPOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _as_real(owner: str, name: str, value: Any) -> float:
    """``value`` as a float: a real number, or a one-element tensor / array (e.g. a 0-d
    ``torch.Tensor``, converted with ``.item()``). Anything else is a ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be a number, got the bool {value!r}.")
    if isinstance(value, numbers.Real):
        return float(value)
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    count = numel() if callable(numel) else numel
    if hasattr(value, "item") and count == 1:
        item = value.item()
        if isinstance(item, numbers.Real) and not isinstance(item, bool):
            return float(item)
    raise ValueError(
        f"{owner}: {name} must be a real number (or a one-element tensor), got "
        f"{type(value).__name__} {value!r}; pass float({name})."
    )


def check_step(owner: str, noise_multiplier: Any, sample_rate: Any) -> Tuple[float, float]:
    """Validate one privacy event and return it as ``(noise_multiplier, sample_rate)`` floats.

    One-element tensors/arrays are converted with ``.item()``; ``owner`` names the caller in the
    error.

    Raises:
        ValueError: ``noise_multiplier`` is not a finite number >= 0, or ``sample_rate`` is not
            a number in [0, 1].
    """
    noise_multiplier = _as_real(owner, "noise_multiplier", noise_multiplier)
    sample_rate = _as_real(owner, "sample_rate", sample_rate)
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(
            f"{owner}: noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}."
        )
    if not 0 <= sample_rate <= 1:
        raise ValueError(
            f"{owner}: sample_rate must be in [0, 1], got {sample_rate!r}. With gradient "
            "accumulation the effective rate is sample_rate * accumulated_iterations, which "
            "must stay <= 1."
        )
    return noise_multiplier, sample_rate


def check_delta(owner: str, delta: float) -> None:
    """Validate a target ``delta``, which must be a real number in the open interval (0, 1).

    Args:
        owner: Name of the caller, used as the prefix of the error message.
        delta: Target delta of (epsilon, delta)-DP.

    Raises:
        ValueError: If ``delta`` is not a real number, is NaN, or lies outside (0, 1).
    """
    if not isinstance(delta, numbers.Real) or not 0 < delta < 1 or math.isnan(delta):
        raise ValueError(f"{owner}: delta must be in (0, 1), got {delta!r}.")


class IAccountant(abc.ABC):
    """Records privacy events and converts them to (epsilon, delta)-DP.

    ``history`` is a list of ``(noise_multiplier, sample_rate, num_steps)``; consecutive steps
    with the same (noise_multiplier, sample_rate) are merged into one entry.
    """

    def __init__(self):
        self.history: List[Tuple[float, float, int]] = []

    @abc.abstractmethod
    def step(self, *, noise_multiplier: float, sample_rate: float):
        """Record one step of the (subsampled) Gaussian mechanism.

        Args:
            noise_multiplier: sigma of the step: noise standard deviation divided by the clipping
                norm.
            sample_rate: the probability with which each example was sampled into the step's batch.
        """

    @abc.abstractmethod
    def get_epsilon(self, delta: float, *args, **kwargs) -> float:
        """Epsilon spent so far at the given delta.

        Args:
            delta: the δ of the (ε, δ) guarantee.

        Returns:
            ε spent by the recorded history at ``delta``.
        """

    @classmethod
    @abc.abstractmethod
    def mechanism(cls) -> str:
        """Name under which the accountant is registered (e.g. ``"rdp"``).

        Returns:
            the registry name of the accountant.
        """

    def __len__(self) -> int:
        """Total number of recorded steps."""
        return sum(num_steps for _, _, num_steps in self.history)

    def _record(self, noise_multiplier: float, sample_rate: float) -> None:
        """Append one step to ``history``, merging it with the last entry when equal."""
        noise_multiplier, sample_rate = check_step(
            f"{type(self).__name__}.step", noise_multiplier, sample_rate
        )
        if self.history:
            last_sigma, last_q, last_steps = self.history[-1]
            if last_sigma == noise_multiplier and last_q == sample_rate:
                self.history[-1] = (last_sigma, last_q, last_steps + 1)
                return
        self.history.append((noise_multiplier, sample_rate, 1))

    def get_optimizer_hook_fn(self, sample_rate: float) -> Callable[["DPOptimizer"], None]:
        """Hook for ``DPOptimizer.step_hook``: one accountant step per optimizer step.

        With gradient accumulation over ``optim.accumulated_iterations`` Poisson batches, one
        optimizer step samples each example with probability ``sample_rate * accumulated``.

        Args:
            sample_rate: the sampling probability of one batch (one backward pass).

        Returns:
            a function of the optimizer that records one step of this accountant.
        """

        def hook_fn(optim: "DPOptimizer") -> None:
            self.step(
                noise_multiplier=optim.noise_multiplier,
                sample_rate=sample_rate * optim.accumulated_iterations,
            )

        return hook_fn

    def state_dict(self, destination: Optional[T_state_dict] = None) -> T_state_dict:
        """``{"history": [...], "mechanism": name}``, written into ``destination`` if given.

        Args:
            destination: a dict to write the entries into (a new dict if None).

        Returns:
            ``destination`` (or the new dict) holding ``history`` and ``mechanism``.
        """
        if destination is None:
            destination = {}
        destination["history"] = copy.deepcopy(self.history)
        destination["mechanism"] = self.__class__.mechanism()
        return destination

    def load_state_dict(self, state_dict: T_state_dict):
        """Restore ``history`` from :meth:`state_dict` output of the same kind of accountant.

        Raises:
            ValueError: ``state_dict`` is None or empty, lacks ``history`` or ``mechanism``, was
                saved by another mechanism, or holds an invalid history entry.

        Args:
            state_dict: the dict returned by :meth:`state_dict`.
        """
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping) or not state_dict:
            raise ValueError(
                f"{owner}: expected a non-empty dict with 'history' and 'mechanism' as produced "
                f"by state_dict(), got {state_dict!r}."
            )
        for key in ("history", "mechanism"):
            if key not in state_dict:
                raise ValueError(
                    f"{owner}: the state dict has no {key!r} key (it has {sorted(state_dict)}); "
                    "pass the output of accountant.state_dict()."
                )
        mechanism = state_dict["mechanism"]
        if mechanism != self.__class__.mechanism():
            raise ValueError(
                f"{owner}: state was saved by a {mechanism!r} accountant, this one is "
                f"{self.__class__.mechanism()!r}; create the accountant with "
                f"create_accountant({mechanism!r}) instead."
            )
        self.history = [self._history_entry(owner, entry) for entry in state_dict["history"]]

    @staticmethod
    def _history_entry(owner: str, entry) -> Tuple[float, float, int]:
        try:
            sigma, q, num_steps = entry
        except (TypeError, ValueError):
            raise ValueError(
                f"{owner}: each history entry must be (noise_multiplier, sample_rate, "
                f"num_steps), got {entry!r}."
            ) from None
        sigma, q = check_step(owner, sigma, q)
        if (
            isinstance(num_steps, bool)
            or not isinstance(num_steps, numbers.Real)
            or not math.isfinite(num_steps)
            or int(num_steps) != num_steps
            or num_steps < 0
        ):
            raise ValueError(f"{owner}: num_steps must be an integer >= 0, got {num_steps!r}.")
        return sigma, q, int(num_steps)

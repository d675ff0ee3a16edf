"""``PrivacyEngine``: turn a model, optimizer and data loader into their DP-SGD counterparts.

``make_private`` composes the three independent parts of DP-SGD (Abadi et al. 2016):
the model gets per-sample gradient (or norm) hooks (``grad_sample/``), the optimizer clips, sums
and noises them (``optimizers/``), the data loader draws Poisson batches (``data_loader``); the
accountant is attached as the optimizer's step hook so that every real step is recorded.
"""

import math
import numbers
import os
import warnings
from typing import IO, Any, BinaryIO, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim import Optimizer
from torch.utils.data import BatchSampler, DataLoader

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import (
    CyclicPoissonDataLoader,
    DPDataLoader,
    _rate_for_batches,
    switch_generator,
)
from opacus.data_loader.samplers import CyclicPoissonSampler
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample.ghost_loss import DPLossFastGradientClipping
from opacus.grad_sample.grad_sample_module import GradSampleHooks, GradSampleModule
from opacus.grad_sample.gsm_base import AbstractGradSampleHooks, AbstractGradSampleModule
from opacus.grad_sample.modes import grad_sample_mode_info, validate_loss_reduction
from opacus.grad_sample.utils import get_gsm_class, prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.optimizers.correlated_noise import BandedMatrixFactorizationNoise
from opacus.optimizers.ddp_perlayeroptimizer import (
    DistributedPerLayerOptimizer,
    SimpleDistributedPerLayerOptimizer,
)
from opacus.optimizers.noise import secure_generator
from opacus.optimizers.optimizer import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.schedulers.grad_clip_scheduler import _GradClipScheduler
from opacus.schedulers.noise_scheduler import _NoiseScheduler
from opacus.validators.module_validator import ModuleValidator

__all__ = [
    "AbstractGradSampleModule",
    "DPDDP",
    "DPDataLoader",
    "DPLossFastGradientClipping",
    "DPOptimizer",
    "GradSampleHooks",
    "GradSampleModule",
    "ModuleValidator",
    "PrivacyEngine",
    "create_accountant",
    "get_gsm_class",
    "get_noise_multiplier",
    "get_optimizer_class",
    "prepare_module",
    "switch_generator",
]

_PathLike = Union[str, os.PathLike, BinaryIO, IO[bytes]]

# Checkpoint keys.
_MODULE_KEY = "module_state_dict"
_ACCOUNTANT_KEY = "privacy_accountant_state_dict"
_OPTIMIZER_KEY = "optimizer_state_dict"
_NOISE_SCHEDULER_KEY = "noise_scheduler_state_dict"
_GRAD_CLIP_SCHEDULER_KEY = "grad_clip_scheduler_state_dict"
_NOISE_MECHANISM_KEY = "noise_mechanism_state_dict"

# make_private(**kwargs) keys of the correlated-noise mode (popped before the optimizer's kwargs).
_BANDED_MF_KWARGS = (
    "noise_mechanism",
    "bands",
    "noise_coefficients",
    "noise_horizon",
    "group_seed",
    "unsafe_banded_mf_without_cyclic_sampling",
)


_SECURE_MODE_WARNING = (
    "PrivacyEngine(secure_mode=True): the noise is drawn from the OS CSPRNG, but the batches are "
    "drawn with torch's Mersenne Twister seeded from it (secrets), which is NOT cryptographically "
    "secure: an adversary who observes enough of its outputs can predict which samples later "
    "batches hold. Secure mode does not cover timing side channels or access to the process "
    "memory either (see PrivacyEngine's docstring)."
)


def _is_distributed_module(module: nn.Module) -> bool:
    return isinstance(module, (DPDDP, DDP))


def _process_group_running() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_optimizer_params_in_module(module: nn.Module, optimizer: Optimizer) -> None:
    module_params = {id(p) for p in module.parameters()}
    foreign = [
        i
        for i, group in enumerate(optimizer.param_groups)
        for p in group["params"]
        if id(p) not in module_params
    ]
    if foreign:
        raise ValueError(
            "Module parameters are different than optimizer Parameters: the optimizer holds "
            f"parameters that are not parameters of the module (param groups "
            f"{sorted(set(foreign))}), and DP-SGD can only privatise gradients it computes per "
            "sample. Build the optimizer from module.parameters() of the model passed to "
            "make_private (ModuleValidator.fix returns a copy: build the optimizer after it)."
        )


def _as_real(value, name: str, where: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{where}: {name} must be a number, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def _validated_noise_multiplier(noise_multiplier, where: str) -> float:
    value = _as_real(noise_multiplier, "noise_multiplier", where)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"{where}: noise_multiplier={value} must be a finite number >= 0 (the Gaussian "
            "noise's standard deviation in units of max_grad_norm)"
        )
    return value


def _validated_max_grad_norm(max_grad_norm, where: str):
    if isinstance(max_grad_norm, (list, tuple)):
        return [_validated_max_grad_norm(m, where) for m in max_grad_norm]
    value = _as_real(max_grad_norm, "max_grad_norm", where)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{where}: max_grad_norm={value} must be a finite number > 0 (the bound every "
            "sample's gradient norm is clipped to)"
        )
    return value


def _sample_rate_of(data_loader: DataLoader, where: str) -> float:
    """The probability with which one batch of ``data_loader`` holds a given sample.

    The loader's (or its batch sampler's) own ``sample_rate`` when it has one (Poisson loaders: the
    rate the sampler really uses, not ``1 / len``), else ``1 / len(data_loader)``.
    """
    for source in (data_loader, getattr(data_loader, "batch_sampler", None)):
        rate = getattr(source, "sample_rate", None)
        if rate is not None:
            return float(rate)
    try:
        n_batches = len(data_loader)
    except TypeError:
        raise ValueError(
            f"{where}: the data loader has no length, so its sample rate is unknown; use a "
            "map-style dataset (or DPDataLoader(dataset, sample_rate=...))"
        ) from None
    if n_batches == 0:
        raise ValueError(
            f"{where}: the data loader yields no batches (is the data set empty?); DP training "
            "needs at least one sample"
        )
    return 1.0 / n_batches


def _dataset_size(data_loader: DataLoader, where: str) -> int:
    try:
        size = len(data_loader.dataset)
    except TypeError:
        raise ValueError(
            f"{where}: the data set has no length; DP training needs a map-style dataset"
        ) from None
    if size == 0:
        raise ValueError(f"{where}: the data set is empty; DP training needs at least one sample")
    return size


def _hooked_by(module: nn.Module) -> Optional[str]:
    """Where the Opacus hooks ``module`` (or a submodule) already carries come from, if any."""
    for sub in module.modules():
        for table in (sub._forward_pre_hooks, sub._forward_hooks):
            for hook in table.values():
                owner = getattr(hook, "__self__", None) or getattr(
                    getattr(hook, "func", None), "__self__", None
                )
                if isinstance(owner, AbstractGradSampleHooks):
                    return type(owner).__name__
    if getattr(module, "autograd_grad_sample_hooks", None) is not None:
        return "attribute 'autograd_grad_sample_hooks'"
    return None


def _stop_ddp_gradient_sync(ddp: DDP) -> None:
    """Make torch DDP leave ``p.grad`` alone: the DP optimizer all-reduces the clipped sum.

    DDP all-reduces the raw (unclipped) gradient of every backward pass. With Poisson batches
    split into physical batches (BatchMemoryManager) ranks run different numbers of backward
    passes, so those collectives pair with the optimizer's all-reduce of another rank and raw
    gradients enter the update. ``require_backward_grad_sync = False`` is what ``no_sync()``
    sets; here it stays set for good, so gradients accumulate locally, and every rank takes one
    optimizer all-reduce per logical step (the samplers give every rank the same step count).
    """
    ddp.require_backward_grad_sync = False


class _BandedMF:
    """The settings of ``make_private(noise_mechanism="banded_mf", ...)`` (see
    ``PrivacyEngine.make_private``); ``None`` from :meth:`parse` when the mode is not asked for."""

    def __init__(self, kwargs: Dict[str, Any], where: str):
        mechanism = kwargs.pop("noise_mechanism")
        self.unsafe = bool(kwargs.pop("unsafe_banded_mf_without_cyclic_sampling", False))
        self.group_seed = kwargs.pop("group_seed", 0)
        bands = kwargs.pop("bands", None)
        coefficients = kwargs.pop("noise_coefficients", None)
        self.horizon = kwargs.pop("noise_horizon", None)
        if isinstance(mechanism, BandedMatrixFactorizationNoise):
            if bands is not None and bands != mechanism.bands:
                raise ValueError(f"{where}: bands={bands} but the mechanism has {mechanism.bands}")
            if coefficients is not None:
                raise ValueError(
                    f"{where}: noise_coefficients cannot be combined with a mechanism instance"
                )
            self.mechanism = mechanism
            self.bands = mechanism.bands
            return
        if mechanism != "banded_mf":
            raise ValueError(
                f"{where}: noise_mechanism={mechanism!r} is not supported: use 'banded_mf' (or a "
                "BandedMatrixFactorizationNoise), or leave it out for DP-SGD's independent noise"
            )
        if bands is None or isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
            raise ValueError(
                f"{where}: noise_mechanism='banded_mf' needs bands=b, an integer >= 1 (the "
                f"number of bands of C and of sampling groups), got bands={bands!r}"
            )
        self.bands = bands
        self.coefficients = "sqrt" if coefficients is None else coefficients
        self.mechanism = None  # built by build(), once the horizon is known

    @classmethod
    def parse(cls, kwargs: Dict[str, Any], where: str) -> Optional["_BandedMF"]:
        if kwargs.get("noise_mechanism") is None:
            kwargs.pop("noise_mechanism", None)
            present = [k for k in _BANDED_MF_KWARGS if k in kwargs]
            if present:
                raise ValueError(f"{where}: {present} only apply with noise_mechanism='banded_mf'")
            return None
        return cls(kwargs, where)

    def build(self, where: str) -> BandedMatrixFactorizationNoise:
        if self.mechanism is not None:
            return self.mechanism
        if isinstance(self.coefficients, str):
            if self.coefficients == "sqrt":
                self.mechanism = BandedMatrixFactorizationNoise.banded_sqrt(self.bands)
            elif self.coefficients == "optimized":
                if self.horizon is None:
                    raise ValueError(
                        f"{where}: noise_coefficients='optimized' needs noise_horizon=T (the "
                        "number of training steps the coefficients are optimised for)"
                    )
                self.mechanism = BandedMatrixFactorizationNoise.optimized(
                    self.bands, int(self.horizon)
                )
            else:
                raise ValueError(
                    f"{where}: noise_coefficients={self.coefficients!r}: use 'sqrt' (default), "
                    "'optimized' or a sequence c_0 = 1, ..., c_(b-1)"
                )
        else:
            self.mechanism = BandedMatrixFactorizationNoise(self.coefficients, bands=self.bands)
        return self.mechanism

    def is_cyclic(self, data_loader: DataLoader) -> bool:
        sampler = getattr(data_loader, "batch_sampler", None)
        return isinstance(sampler, CyclicPoissonSampler)

    def check_loader(self, data_loader: DataLoader, where: str) -> None:
        sampler = getattr(data_loader, "batch_sampler", None)
        if isinstance(sampler, CyclicPoissonSampler) and sampler.bands != self.bands:
            raise ValueError(
                f"{where}: the CyclicPoissonDataLoader has {sampler.bands} groups but "
                f"bands={self.bands}; they must be equal"
            )

    def needs_unsafe(self, data_loader: DataLoader, poisson_sampling: bool) -> bool:
        """b > 1 with batches that are not cyclic Poisson batches (and that the engine will not
        turn into them)."""
        if self.bands == 1 or self.is_cyclic(data_loader):
            return False
        plain = type(getattr(data_loader, "batch_sampler", None)) is BatchSampler
        return not (poisson_sampling and plain)

    def check_optimizer(self, optimizer: DPOptimizer, where: str) -> None:
        supported = (DPOptimizer.add_noise, DPOptimizerFastGradientClipping.add_noise)
        if type(optimizer).add_noise not in supported:
            raise ValueError(
                f"{where}: noise_mechanism='banded_mf' is not available with "
                f"{type(optimizer).__name__} (it draws its noise its own way: adaptive "
                "clipping, per-layer clipping in backward under DDP, or FSDP). Use flat or "
                "per-layer clipping with a non-FSDP grad_sample_mode."
            )

    def hook(self, accountant, sample_rate: float, amplified: bool):
        """The accountant's step hook: the reduced DP-SGD events (module docstring of
        ``opacus.optimizers.correlated_noise``), or, without amplification, one full-batch event
        per step at the noise multiplier of the per-step sensitivity."""
        mechanism = self.mechanism
        b = mechanism.bands
        col = mechanism.column_norm
        abs_prefix = [sum(abs(c) for c in mechanism.coefficients[: k + 1]) for k in range(b)]

        def hook_fn(optim: DPOptimizer) -> None:
            step = mechanism.steps - 1
            if not amplified:
                sensitivity = abs_prefix[min(step, b - 1)]
                accountant.step(
                    noise_multiplier=optim.noise_multiplier * col / sensitivity, sample_rate=1.0
                )
                return
            if optim.accumulated_iterations != 1:
                raise ValueError(
                    "banded MF: one optimizer step took several Poisson batches "
                    f"({optim.accumulated_iterations} backward passes); with cyclic sampling "
                    "each step must use exactly one batch (use BatchMemoryManager for virtual "
                    "steps)"
                )
            if step % b == 0:
                accountant.step(noise_multiplier=optim.noise_multiplier, sample_rate=sample_rate)

        return hook_fn


def _unsafe_message(where: str, bands: int) -> str:
    return (
        f"{where}: noise_mechanism='banded_mf' with bands={bands} needs cyclic Poisson sampling "
        "(the data set split into `bands` groups, step t sampling group t mod bands only): the "
        "amplification theorem that reduces its privacy to DP-SGD with ceil(T / bands) steps "
        "does not hold for this data loader (plain Poisson over the whole data set, or "
        "poisson_sampling=False). Pass a plain DataLoader with poisson_sampling=True (the engine "
        "makes it cyclic) or a CyclicPoissonDataLoader. "
        "unsafe_banded_mf_without_cyclic_sampling=True keeps the loader and accounts every step "
        "as a full-batch Gaussian mechanism without amplification (far larger epsilon)."
    )


def _banded_calibration(banded, data_loader, poisson_sampling, epochs, kwargs, where):
    """``(q, ceil(T / b))`` for ``make_private_with_epsilon`` with banded MF (``b > 1``):
    ``T = int(epochs * len(data_loader))`` steps (the cyclic loader keeps the loader's length);
    ``q`` is the per-group rate the cyclic loader will use. Sets ``noise_horizon = T`` for
    optimised coefficients when it is not given."""
    if banded.needs_unsafe(data_loader, poisson_sampling):
        raise ValueError(
            _unsafe_message(where, banded.bands)
            + " make_private_with_epsilon calibrates through the amplified reduction only."
        )
    if banded.is_cyclic(data_loader):
        sample_rate = float(data_loader.sample_rate)
    else:
        sample_rate = banded.bands * _rate_for_batches(len(data_loader))
        if sample_rate > 1.0:
            raise ValueError(
                f"{where}: bands={banded.bands} groups are smaller than the expected batch size; "
                f"use at most {len(data_loader)} bands or a smaller batch size"
            )
    total_steps = int(epochs * len(data_loader))
    if total_steps < 1:
        raise ValueError(f"{where}: epochs={epochs} gives no training step")
    if kwargs.get("noise_coefficients") == "optimized" and kwargs.get("noise_horizon") is None:
        kwargs["noise_horizon"] = total_steps
    return sample_rate, math.ceil(total_steps / banded.bands)


def _check_banded_loader(banded, data_loader, poisson_sampling, where) -> bool:
    """For banded MF: True if the loader voids amplification (allowed only when opted in)."""
    if banded is None:
        return False
    banded.check_loader(data_loader, where)
    unamplified = banded.needs_unsafe(data_loader, poisson_sampling)
    if unamplified and not banded.unsafe:
        raise ValueError(_unsafe_message(where, banded.bands))
    return unamplified


def _checked_mode(grad_sample_mode, clipping, where):
    """The mode's row of the table, refusing a ``clipping`` that the mode does not support."""
    mode = grad_sample_mode_info(grad_sample_mode)
    if clipping not in mode.clippings and clipping in ("flat", "per_layer", "adaptive"):
        raise ValueError(
            f"{where}: grad_sample_mode={grad_sample_mode!r} supports clipping in "
            f"{list(mode.clippings)}, got clipping={clipping!r}."
        )
    return mode


class PrivacyEngine:
    """Entry point of DP training: wraps model, optimizer and data loader and tracks privacy.

    Args:
        accountant: privacy accountant, ``"prv"`` (default), ``"rdp"`` or ``"gdp"``.
        secure_mode: harden the random draws against an adversary who sees the released
            models and knows everything else. What it protects against: (1) noise that could be
            predicted or read off the released values: the optimizer draws it from the OS
            CSPRNG, with the floating-point countermeasure of Holohan and Braghin 2021 against
            attacks on the least significant bits of Gaussian samples (Mironov 2012), and a
            ``noise_generator`` may not be given; (2) guessable or reused seeds for the batches:
            the Poisson sampler (and, without Poisson sampling, the loader's shuffling) uses a
            ``torch.Generator`` seeded with 63 bits from the OS CSPRNG (``secrets``). What it does
            **not** protect against: torch's generators are not CSPRNGs, so an adversary who
            observes enough of the sampler's outputs can predict later batch compositions;
            timing side channels; anyone who can read the process memory. Constructing an
            engine with ``secure_mode=True`` says so once, in a ``UserWarning``.

    Example::

        engine = PrivacyEngine()
        model, optimizer, data_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=data_loader,
            noise_multiplier=1.1, max_grad_norm=1.0)
        ... train ...
        epsilon = engine.get_epsilon(delta=1e-5)
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        self.accountant = create_accountant(mechanism=accountant)
        self.secure_mode = secure_mode
        if secure_mode:
            warnings.warn(_SECURE_MODE_WARNING, UserWarning, stacklevel=2)
        self.secure_rng = secure_generator("cpu") if secure_mode else None
        self.dataset = None  # set by make_private, for information only
        # Set by make_private for _prepare_optimizer: torch DDP reduces p.grad in backward.
        self._ddp_syncs_gradients = False

    # ------------------------------------------------------------------ the three parts
    def _prepare_model(
        self,
        module: nn.Module,
        *,
        batch_first: bool,
        loss_reduction: str,
        grad_sample_mode: str,
        wrap_model: bool,
        max_grad_norm,
    ):
        mode = grad_sample_mode_info(grad_sample_mode)
        if isinstance(module, AbstractGradSampleModule) or isinstance(module, GradSampleHooks):
            expected = tuple(c for c in (mode.module_class, mode.hooks_class) if c is not None)
            if not isinstance(module, expected):
                raise ValueError(
                    f"The module is already wrapped in {type(module).__name__} but "
                    f"grad_sample_mode={grad_sample_mode!r} needs "
                    f"{' or '.join(c.__name__ for c in expected)}: pass the unwrapped model "
                    "(gsm._module) instead."
                )
            if module.batch_first != batch_first or module.loss_reduction != loss_reduction:
                raise ValueError(
                    f"The module is already wrapped with batch_first={module.batch_first}, "
                    f"loss_reduction={module.loss_reduction!r}; make_private was given "
                    f"batch_first={batch_first}, loss_reduction={loss_reduction!r}."
                )
            return module
        hooked_by = _hooked_by(module)
        if hooked_by is not None:
            raise ValueError(
                "PrivacyEngine.make_private: the module already carries Opacus per-sample "
                f"gradient hooks ({hooked_by}, installed by an earlier make_private "
                "or GradSampleModule call); hooking it again would compute every per-sample "
                "gradient twice. Pass the module that earlier call returned, or remove its hooks "
                "first (remove_hooks() / cleanup() on it)."
            )
        self.validate(module=module, optimizer=None, data_loader=None)
        return prepare_module(
            module,
            grad_sample_mode,
            wrap_model,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            **mode.hook_kwargs(max_grad_norm=max_grad_norm),
        )

    def _prepare_data_loader(
        self,
        data_loader: DataLoader,
        *,
        poisson_sampling: bool,
        distributed: bool,
        batch_first: bool,
        rand_on_empty: bool,
        banded: Optional[_BandedMF] = None,
    ) -> DataLoader:
        if banded is not None and banded.is_cyclic(data_loader):
            # Already cyclic Poisson: kept (secure mode retargets its generator).
            if self.secure_mode:
                data_loader.batch_sampler.generator = self.secure_rng
            return data_loader
        if banded is not None and banded.bands > 1 and poisson_sampling:
            return CyclicPoissonDataLoader.from_data_loader(
                data_loader,
                bands=banded.bands,
                group_seed=banded.group_seed,
                generator=self.secure_rng,
                distributed=distributed,
                batch_first=batch_first,
                rand_on_empty=rand_on_empty,
            )
        if poisson_sampling:
            return DPDataLoader.from_data_loader(
                data_loader,
                generator=self.secure_rng,
                distributed=distributed,
                batch_first=batch_first,
                rand_on_empty=rand_on_empty,
            )
        if self.secure_mode:
            return switch_generator(data_loader=data_loader, generator=self.secure_rng)
        return data_loader

    def _prepare_optimizer(
        self,
        *,
        optimizer: Optimizer,
        noise_multiplier: float,
        max_grad_norm,
        expected_batch_size: int,
        loss_reduction: str,
        distributed: bool,
        clipping: str,
        noise_generator,
        grad_sample_mode: str,
        **kwargs,
    ) -> DPOptimizer:
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        optim_class = get_optimizer_class(
            clipping=clipping, distributed=distributed, grad_sample_mode=grad_sample_mode
        )
        if optim_class is DistributedPerLayerOptimizer and not self._ddp_syncs_gradients:
            # It returns each rank's private gradient to torch DDP's all-reduce; without torch
            # DDP (DPDDP registers no gradient hooks) nothing would combine the ranks' gradients,
            # and ranks other than 0 would step on un-noised sums. Clip at step and all-reduce.
            optim_class = SimpleDistributedPerLayerOptimizer
        return optim_class(
            optimizer=optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=noise_generator,
            secure_mode=self.secure_mode,
            **kwargs,
        )

    # ------------------------------------------------------------------ public API
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        criterion=nn.CrossEntropyLoss(),  # noqa: B008 (the public signature's default)
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: Union[float, List[float]],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        **kwargs,
    ) -> Union[
        Tuple[nn.Module, DPOptimizer, DataLoader],
        Tuple[nn.Module, DPOptimizer, DPLossFastGradientClipping, DataLoader],
    ]:
        """Make ``module``, ``optimizer`` and ``data_loader`` private.

        Returns ``(module, optimizer, data_loader)``: the model with per-sample gradient hooks
        (``grad_sample_mode``), a DP optimizer (``clipping``: ``"flat"``, ``"per_layer"`` or
        ``"adaptive"``) whose every real step is recorded by the accountant, and a Poisson data
        loader with the same expected batch size (``poisson_sampling=True``). With a ghost
        clipping mode (``"ghost"``, ``"ghost_fsdp"``, ``"ghost_tp"``; see
        ``opacus.grad_sample.modes``) it returns ``(module, optimizer, criterion,
        data_loader)`` where ``criterion`` is a ``DPLossFastGradientClipping`` whose
        ``backward`` does the two-pass ghost clipping.

        The accountant records, at each real step, the sample rate the data loader really uses:
        its (or its batch sampler's) ``sample_rate`` when it has one, else
        ``1 / len(data_loader)``; times the number of backward passes accumulated into that step.

        The model is checked with ``ModuleValidator`` (use ``get_compatible_module`` to fix it);
        every optimizer parameter must belong to ``module``; a ``DPDDP``/``DDP`` module selects
        the distributed optimizer and sampler. With torch ``DistributedDataParallel`` the DP
        optimizer all-reduces the clipped sums itself, so DDP's own all-reduce of the raw
        gradients is switched off (``require_backward_grad_sync = False``, as in ``no_sync()``),
        except for ``DistributedPerLayerOptimizer``, which hands DDP already private gradients.
        With Poisson sampling the model refuses gradient accumulation across batches (use
        ``BatchMemoryManager``). Extra ``kwargs`` go to the optimizer.

        Args:
            module: the model to train (an ``nn.Module``, or a model already wrapped for the same
                ``grad_sample_mode``, ``batch_first`` and ``loss_reduction``). It is checked with
                ``ModuleValidator``; fix it first with ``get_compatible_module``.
            optimizer: the optimizer built on ``module``'s parameters (every one of its parameters
                must belong to ``module``); it is wrapped in a DP optimizer that clips, noises and
                then calls its ``step``.
            criterion: the loss function; used only by the ghost clipping modes, where the returned
                ``DPLossFastGradientClipping`` wraps it (``nn.CrossEntropyLoss()`` by default).
            data_loader: the training data loader; with ``poisson_sampling`` it is replaced by a
                ``DPDataLoader`` with the same dataset and expected batch size ``batch_size``.
            noise_multiplier: sigma: the standard deviation of the Gaussian noise added to the sum
                of clipped per-sample gradients, divided by ``max_grad_norm``. Larger means more
                privacy (smaller ε) and less accuracy.
            max_grad_norm: C: the L2 norm every example's gradient is clipped to (a list with one
                norm per parameter for ``clipping="per_layer"``).
            batch_first: True if the batch is dimension 0 of every layer's input and output tensors,
                False if it is dimension 1 (sequence-first models).
            loss_reduction: ``"mean"`` if the loss averages over the batch (as
                ``nn.CrossEntropyLoss()`` does by default), ``"sum"`` if it sums; per-sample
                gradients are rescaled accordingly.
            poisson_sampling: draw every batch by Poisson sampling (each example joins with
                probability ``batch_size / len(dataset)``), the sampling the accountant assumes.
                False keeps the loader's own batches, and the reported ε is then not a proven
                guarantee.
            clipping: ``"flat"`` (one norm over all parameters), ``"per_layer"`` (one
                ``max_grad_norm`` per parameter) or ``"adaptive"`` (the clipping norm follows a
                private quantile of the gradient norms; needs the ``AdaClipDPOptimizer`` keyword
                arguments).
            noise_generator: a ``torch.Generator`` for the noise (reproducible runs); not allowed
                with ``secure_mode``.
            grad_sample_mode: how per-sample gradients are obtained: ``"hooks"`` (default),
                ``"functorch"``, ``"ew"`` (expanded weights), ``"no_op"``, or a ghost clipping mode
                (``"ghost"``, ``"ghost_fsdp"``, ``"ghost_tp"``) that computes only their norms.
            wrap_model: wrap the model in a ``GradSampleModule`` (True) or attach the hooks to the
                model itself and return it unchanged in type (False).
            rand_on_empty: an empty Poisson batch becomes one data-independent random example
                instead of a batch of size 0, for models that cannot run on an empty batch.
            **kwargs: go to the optimizer, except the correlated-noise settings
                (``opacus.optimizers.correlated_noise``): ``noise_mechanism="banded_mf"`` with
                ``bands=b`` adds banded matrix-factorization noise (``b - 1`` model-sized
                buffers) instead of independent noise; ``noise_coefficients`` is ``"sqrt"``
                (default), ``"optimized"`` (needs ``noise_horizon=T`` steps) or a sequence
                ``c_0 = 1, ...``; a ``BandedMatrixFactorizationNoise`` may be passed as
                ``noise_mechanism``. For ``b > 1`` the loader becomes a
                ``CyclicPoissonDataLoader`` (same expected batch size and epoch length,
                ``group_seed`` seeds the split into ``b`` groups; a ``CyclicPoissonDataLoader``
                is kept) and the accountant records one DP-SGD event per ``b`` steps
                (``ceil(T / b)`` steps at the per-group rate). A plain Poisson loader or
                ``poisson_sampling=False`` with ``b > 1`` raises ``ValueError`` unless
                ``unsafe_banded_mf_without_cyclic_sampling=True``; then every step is accounted
                as a full-batch Gaussian mechanism (``sample_rate=1``) at noise multiplier
                ``sigma ||c||_2 / sum_{j <= min(t, b-1)} |c_j|``, without amplification.
                Adaptive clipping, FSDP and per-layer clipping in backward under DDP are refused.
                ``b = 1`` is DP-SGD, bit for bit.

        Returns:
            ``(module, optimizer, data_loader)``, or ``(module, optimizer, criterion,
                data_loader)`` for the ghost clipping modes.

        Raises:
            ValueError: an argument is invalid or inconsistent (for example a ``noise_generator`` in
                secure mode, optimizer parameters outside ``module``, a model already hooked, or a
                model that ``ModuleValidator`` rejects).
        """
        where = f"{type(self).__name__}.make_private"
        banded = _BandedMF.parse(kwargs, where)
        unamplified = _check_banded_loader(banded, data_loader, poisson_sampling, where)
        if noise_generator is not None and self.secure_mode:
            raise ValueError(
                "noise_generator cannot be used with secure_mode=True: secure mode draws the "
                "noise from its own securely seeded source. Drop noise_generator."
            )
        _check_optimizer_params_in_module(module, optimizer)
        validate_loss_reduction(loss_reduction, where)
        mode = _checked_mode(grad_sample_mode, clipping, where)
        noise_multiplier = _validated_noise_multiplier(noise_multiplier, where)
        max_grad_norm = _validated_max_grad_norm(max_grad_norm, where)
        _dataset_size(data_loader, where)
        # FSDP is data parallel by itself: every rank must sample its own shard of the data.
        distributed = _is_distributed_module(module) or (mode.fsdp and _process_group_running())
        ddp = module if isinstance(module, DDP) else None

        module = self._prepare_model(
            module,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            grad_sample_mode=grad_sample_mode,
            wrap_model=wrap_model,
            max_grad_norm=max_grad_norm,
        )
        if poisson_sampling and hasattr(module, "forbid_grad_accumulation"):
            # Poisson batches differ in size: per-sample rows of two batches must never be summed.
            module.forbid_grad_accumulation()

        data_loader = self._prepare_data_loader(
            data_loader,
            poisson_sampling=poisson_sampling,
            distributed=distributed,
            batch_first=batch_first,
            rand_on_empty=rand_on_empty,
            banded=None if unamplified else banded,
        )
        self.dataset = data_loader.dataset
        sample_rate = _sample_rate_of(data_loader, where)
        expected_batch_size = _dataset_size(data_loader, where) * sample_rate
        if isinstance(getattr(data_loader, "batch_sampler", None), CyclicPoissonSampler):
            # Cyclic Poisson: the rate applies within one of the `bands` groups.
            expected_batch_size /= data_loader.batch_sampler.bands
        if distributed:
            # Each rank divides its share of the noisy sum by its own expected batch size; the
            # distributed optimizer then averages over ranks.
            expected_batch_size /= dist.get_world_size()
        expected_batch_size = max(1, int(round(expected_batch_size)))

        self._ddp_syncs_gradients = ddp is not None
        optimizer = self._prepare_optimizer(
            optimizer=optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            distributed=distributed,
            clipping=clipping,
            noise_generator=noise_generator,
            grad_sample_mode=grad_sample_mode,
            **kwargs,
        )
        if ddp is not None and not isinstance(optimizer, DistributedPerLayerOptimizer):
            _stop_ddp_gradient_sync(ddp)
        # The hook records sample_rate * optimizer.accumulated_iterations at each real step.
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        if banded is not None:
            self._attach_banded_noise(banded, optimizer, sample_rate, unamplified, where)
        if mode.skips_batch_gradient and not distributed and isinstance(module, GradSampleHooks):
            # The DP optimizer replaces p.grad with the noisy clipped sum: backward need not
            # compute the non-private batch gradient (opacus.grad_sample.batch_gradients). Kept
            # under data parallelism, whose gradient hooks and all-reduce run on p.grad.
            module.compute_batch_gradients = False

        if mode.returns_criterion:
            dp_criterion = DPLossFastGradientClipping(module, optimizer, criterion, loss_reduction)
            return module, optimizer, dp_criterion, data_loader
        return module, optimizer, data_loader

    def _attach_banded_noise(self, banded, optimizer, sample_rate, unamplified, where) -> None:
        """Give ``optimizer`` the correlated-noise mechanism and, for ``b > 1``, its accounting."""
        banded.check_optimizer(optimizer, where)
        optimizer.noise_mechanism = banded.build(where)
        if banded.bands > 1:
            optimizer.attach_step_hook(
                banded.hook(self.accountant, sample_rate, amplified=not unamplified)
            )

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        criterion=nn.CrossEntropyLoss(),  # noqa: B008 (the public signature's default)
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: Union[float, List[float]],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        **kwargs,
    ):
        """``make_private`` with the smallest noise multiplier that keeps ``(ε, δ)`` in budget.

        The noise multiplier is found by ``get_noise_multiplier`` with this engine's accountant
        at the sample rate ``make_private`` will record (the loader's ``sample_rate``, else
        ``1 / len(data_loader)``) for ``int(epochs / sample_rate)`` steps, the same conversion
        as ``get_noise_multiplier(epochs=...)``: after that many steps
        ``get_epsilon(target_delta) <= target_epsilon`` (and within ``epsilon_tolerance``, a
        keyword argument, of it).

        With ``noise_mechanism="banded_mf"`` and ``bands=b > 1`` (see ``make_private``) the
        search runs through the amplification reduction instead: ``T = int(epochs *
        len(data_loader))`` steps, ``ceil(T / b)`` DP-SGD steps at the cyclic loader's per-group
        rate (``b / len(data_loader)`` for a plain loader); ``noise_coefficients="optimized"``
        is optimised for ``T`` unless ``noise_horizon`` is given.

        Args:
            module: the model to train (an ``nn.Module``, or a model already wrapped for the same
                ``grad_sample_mode``, ``batch_first`` and ``loss_reduction``). It is checked with
                ``ModuleValidator``; fix it first with ``get_compatible_module``.
            optimizer: the optimizer built on ``module``'s parameters (every one of its parameters
                must belong to ``module``); it is wrapped in a DP optimizer that clips, noises and
                then calls its ``step``.
            criterion: the loss function; used only by the ghost clipping modes, where the returned
                ``DPLossFastGradientClipping`` wraps it (``nn.CrossEntropyLoss()`` by default).
            data_loader: the training data loader; with ``poisson_sampling`` it is replaced by a
                ``DPDataLoader`` with the same dataset and expected batch size ``batch_size``.
            target_epsilon: the ε to spend over the whole run.
            target_delta: the δ at which ``target_epsilon`` is reached (below ``1 / len(dataset)``).
            epochs: the number of epochs the run will train for; the noise multiplier is chosen so
                that ε after ``int(epochs / sample_rate)`` steps stays at or below
                ``target_epsilon``.
            max_grad_norm: C: the L2 norm every example's gradient is clipped to (a list with one
                norm per parameter for ``clipping="per_layer"``).
            batch_first: True if the batch is dimension 0 of every layer's input and output tensors,
                False if it is dimension 1 (sequence-first models).
            loss_reduction: ``"mean"`` if the loss averages over the batch (as
                ``nn.CrossEntropyLoss()`` does by default), ``"sum"`` if it sums; per-sample
                gradients are rescaled accordingly.
            poisson_sampling: draw every batch by Poisson sampling (each example joins with
                probability ``batch_size / len(dataset)``), the sampling the accountant assumes.
                False keeps the loader's own batches, and the reported ε is then not a proven
                guarantee.
            clipping: ``"flat"`` (one norm over all parameters), ``"per_layer"`` (one
                ``max_grad_norm`` per parameter) or ``"adaptive"`` (the clipping norm follows a
                private quantile of the gradient norms; needs the ``AdaClipDPOptimizer`` keyword
                arguments).
            noise_generator: a ``torch.Generator`` for the noise (reproducible runs); not allowed
                with ``secure_mode``.
            grad_sample_mode: how per-sample gradients are obtained: ``"hooks"`` (default),
                ``"functorch"``, ``"ew"`` (expanded weights), ``"no_op"``, or a ghost clipping mode
                (``"ghost"``, ``"ghost_fsdp"``, ``"ghost_tp"``) that computes only their norms.
            wrap_model: wrap the model in a ``GradSampleModule`` (True) or attach the hooks to the
                model itself and return it unchanged in type (False).

        Returns:
            what ``make_private`` returns; the chosen noise multiplier is
                ``optimizer.noise_multiplier``.
        """
        where = f"{type(self).__name__}.make_private_with_epsilon"
        banded = _BandedMF.parse({k: kwargs[k] for k in _BANDED_MF_KWARGS if k in kwargs}, where)
        if len(self.accountant.history) > 0:
            warnings.warn(
                "The privacy accountant already has history: the noise multiplier is chosen for "
                "the new training alone, so the total ε will exceed target_epsilon.",
                stacklevel=2,
            )
        _dataset_size(data_loader, where)
        sample_rate = _sample_rate_of(data_loader, where)
        search_kwargs = {}
        if "epsilon_tolerance" in kwargs:
            search_kwargs["epsilon_tolerance"] = kwargs.pop("epsilon_tolerance")
        if banded is not None and banded.bands > 1:
            sample_rate, steps = _banded_calibration(
                banded, data_loader, poisson_sampling, epochs, kwargs, where
            )
            search_kwargs["steps"] = steps
        else:
            search_kwargs["epochs"] = epochs
        noise_multiplier = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            accountant=self.accountant.mechanism(),
            **search_kwargs,
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling,
            clipping=clipping,
            noise_generator=noise_generator,
            grad_sample_mode=grad_sample_mode,
            wrap_model=wrap_model,
            **kwargs,
        )

    def get_epsilon(self, delta):
        """ε spent so far at the given δ, according to this engine's accountant.

        Args:
            delta: the δ of the (ε, δ) guarantee; pick it below ``1 / len(dataset)``.

        Returns:
            ε spent by the steps recorded so far (``inf`` if a step had no noise).
        """
        return self.accountant.get_epsilon(delta=delta)

    def is_compatible(
        self,
        *,
        module: nn.Module,
        optimizer: Optional[Optimizer],
        data_loader: Optional[DataLoader],
    ) -> bool:
        """True if ``module`` can be trained with DP-SGD as is (see ``ModuleValidator``).

        Args:
            module: the model to check.
            optimizer: accepted for compatibility with Opacus 1.6; not checked.
            data_loader: accepted for compatibility with Opacus 1.6; not checked.

        Returns:
            True if ``ModuleValidator`` finds no problem in ``module``.
        """
        return ModuleValidator.is_valid(module)

    def validate(
        self,
        *,
        module: nn.Module,
        optimizer: Optional[Optimizer],
        data_loader: Optional[DataLoader],
    ):
        """Raise the validator's error if ``module`` cannot be trained with DP-SGD as is.

        Args:
            module: the model to check.
            optimizer: accepted for compatibility with Opacus 1.6; not checked.
            data_loader: accepted for compatibility with Opacus 1.6; not checked.

        Raises:
            UnsupportedModuleError: ``module`` has layers DP-SGD cannot train as they are.
        """
        ModuleValidator.validate(module, strict=True)

    @classmethod
    def get_compatible_module(cls, module: nn.Module) -> nn.Module:
        """A copy of ``module`` with unsupported layers replaced (``ModuleValidator.fix``).

        Args:
            module: the model to fix (it is not modified).

        Returns:
            the fixed copy.
        """
        module = ModuleValidator.fix(module)
        ModuleValidator.validate(module, strict=True)
        return module

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self,
        *,
        path: _PathLike,
        module: Union[nn.Module, GradSampleModule],
        optimizer: Optional[DPOptimizer] = None,
        noise_scheduler: Optional[_NoiseScheduler] = None,
        grad_clip_scheduler: Optional[_GradClipScheduler] = None,
        checkpoint_dict: Optional[Dict[str, Any]] = None,
        module_state_dict_kwargs: Optional[Dict[str, Any]] = None,
        torch_save_kwargs: Optional[Dict[str, Any]] = None,
    ):
        """Save module, accountant and (optionally) optimizer and scheduler states to ``path``.

        Entries of ``checkpoint_dict`` are saved alongside and returned by ``load_checkpoint``.

        Args:
            path: a file path or a writable binary file object.
            module: the model whose ``state_dict`` is saved.
            optimizer: the DP optimizer whose state is saved, if given.
            noise_scheduler: a noise multiplier scheduler whose state is saved, if given.
            grad_clip_scheduler: a clipping norm scheduler whose state is saved, if given.
            checkpoint_dict: extra entries saved alongside (returned by ``load_checkpoint``).
            module_state_dict_kwargs: keyword arguments for ``module.state_dict``.
            torch_save_kwargs: keyword arguments for ``torch.save``.
        """
        checkpoint = dict(checkpoint_dict or {})
        checkpoint[_MODULE_KEY] = module.state_dict(**(module_state_dict_kwargs or {}))
        checkpoint[_ACCOUNTANT_KEY] = self.accountant.state_dict()
        if optimizer is not None:
            checkpoint[_OPTIMIZER_KEY] = optimizer.state_dict()
        if noise_scheduler is not None:
            checkpoint[_NOISE_SCHEDULER_KEY] = noise_scheduler.state_dict()
        if grad_clip_scheduler is not None:
            checkpoint[_GRAD_CLIP_SCHEDULER_KEY] = grad_clip_scheduler.state_dict()
        mechanism = getattr(optimizer, "noise_mechanism", None)
        if mechanism is not None:
            checkpoint[_NOISE_MECHANISM_KEY] = mechanism.state_dict()
        torch.save(checkpoint, path, **(torch_save_kwargs or {}))

    def load_checkpoint(
        self,
        *,
        path: _PathLike,
        module: Union[nn.Module, GradSampleModule],
        optimizer: Optional[DPOptimizer] = None,
        noise_scheduler: Optional[_NoiseScheduler] = None,
        grad_clip_scheduler: Optional[_GradClipScheduler] = None,
        module_load_dict_kwargs: Optional[Dict[str, Any]] = None,
        torch_load_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict:
        """Restore what ``save_checkpoint`` saved and return the whole loaded checkpoint dict.

        The module, the accountant and, when given, the optimizer (its wrapped optimizer's state
        only: DP settings such as ``noise_multiplier`` stay as they are) and the schedulers are
        restored; the user's ``checkpoint_dict`` entries are in the returned dict. A state
        missing from the checkpoint for an object that was given, or saved for one that was
        not, is reported with a ``UserWarning`` and skipped.

        Args:
            path: a file path or a readable binary file object written by ``save_checkpoint``.
            module: the model to load the saved state into.
            optimizer: the DP optimizer to restore the wrapped optimizer's state into, if given.
            noise_scheduler: the noise multiplier scheduler to restore, if given.
            grad_clip_scheduler: the clipping norm scheduler to restore, if given.
            module_load_dict_kwargs: keyword arguments for ``module.load_state_dict``.
            torch_load_kwargs: keyword arguments for ``torch.load``.

        Returns:
            the whole loaded checkpoint dict, ``checkpoint_dict`` entries included.
        """
        checkpoint = torch.load(path, **(torch_load_kwargs or {}))
        module.load_state_dict(checkpoint[_MODULE_KEY], **(module_load_dict_kwargs or {}))
        self.accountant.load_state_dict(checkpoint[_ACCOUNTANT_KEY])
        restorers = (
            (_OPTIMIZER_KEY, optimizer, "optimizer"),
            (_NOISE_SCHEDULER_KEY, noise_scheduler, "noise_scheduler"),
            (_GRAD_CLIP_SCHEDULER_KEY, grad_clip_scheduler, "grad_clip_scheduler"),
        )
        for key, target, name in restorers:
            state = checkpoint.get(key)
            if target is not None and state is None:
                warnings.warn(
                    f"load_checkpoint: {name} was given but the checkpoint holds no {name} "
                    f"state (it was saved without {name}=...); {name} is left as it is.",
                    stacklevel=2,
                )
            elif target is None and state is not None:
                warnings.warn(
                    f"load_checkpoint: the checkpoint holds {name} state but no {name} was "
                    f"given; pass {name}=... to restore it.",
                    stacklevel=2,
                )
            elif target is not None:
                target.load_state_dict(state)
        mechanism = getattr(optimizer, "noise_mechanism", None)
        if mechanism is not None and _NOISE_MECHANISM_KEY in checkpoint:
            mechanism.load_state_dict(checkpoint[_NOISE_MECHANISM_KEY])
        elif mechanism is not None:
            warnings.warn(
                "load_checkpoint: the optimizer has a noise_mechanism but the checkpoint holds "
                "no noise_mechanism state; its noise stream restarts.",
                stacklevel=2,
            )
        return checkpoint

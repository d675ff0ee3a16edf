"""PrivacyEngine contracts: parameter check (cluster 3), the sample rate the accountant records,
argument checks, secure mode, the grad-sample mode table and Poisson accumulation refusal.

Oracles: brute-force per-sample gradients (tests.oracle), ``get_noise_multiplier`` called
directly, the batches the loader actually yields, and the torch.nn reference model.
"""

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.modes import GRAD_SAMPLE_MODES, grad_sample_mode_info
from opacus.grad_sample.utils import get_gsm_class, get_hooks_class
from opacus.optimizers import (
    DPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
    get_optimizer_class,
)
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators.module_validator import ModuleValidator
from tests.oracle import brute_force_grad_samples

N, DIM, CLASSES = 40, 5, 3


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 6), nn.Tanh(), nn.Linear(6, CLASSES))


def _dataset(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    return TensorDataset(x, torch.randint(0, CLASSES, (n,), generator=g))


def _make_private(engine=None, model=None, *, data_loader=None, lr=0.5, **kwargs):
    engine = engine or PrivacyEngine(accountant="rdp")
    model = model if model is not None else _mlp()
    kwargs.setdefault("noise_multiplier", 0.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    out = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=data_loader if data_loader is not None else DataLoader(_dataset(), 10),
        **kwargs,
    )
    return engine, model, out


def _loss(out, y):
    return nn.functional.cross_entropy(out, y)


def _clipped_sum(model, x, y, clip):
    """{name: sum_i min(1, C / ||g_i||) g_i} from the brute-force oracle."""
    gs = brute_force_grad_samples(model, x, loss_fn=_loss, targets=y)
    flat = torch.cat([g.flatten(1) for g in gs.values()], dim=1)
    factor = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factor, g) for n, g in gs.items()}


# ---------------------------------------------------------------- cluster 3
def test_foreign_optimizer_parameters_message():
    model = nn.Sequential(nn.Linear(DIM, 4), nn.BatchNorm1d(4), nn.Linear(4, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fixed = ModuleValidator.fix(model)  # the usual mistake: fix() returns a copy
    for call, extra in (
        ("make_private", dict(noise_multiplier=1.0)),
        ("make_private_with_epsilon", dict(target_epsilon=5.0, target_delta=1e-5, epochs=1)),
    ):
        with pytest.raises(ValueError) as err:
            getattr(PrivacyEngine(), call)(
                module=fixed,
                optimizer=optimizer,
                data_loader=DataLoader(_dataset(), 10),
                max_grad_norm=1.0,
                **extra,
            )
        message = str(err.value)
        assert "Module parameters are different than optimizer Parameters" in message
        assert "ModuleValidator.fix" in message  # the explanation follows the fragment


def test_parameter_check_order():
    model, other = _mlp(), _mlp(1)
    foreign = torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=1)
    kwargs = dict(module=model, data_loader=DataLoader(_dataset(), 10), max_grad_norm=1.0)
    # the secure-mode generator check is the only earlier one
    with pytest.warns(UserWarning, match="secure"):
        secure = PrivacyEngine(secure_mode=True)
    with pytest.raises(ValueError, match="noise_generator"):
        secure.make_private(
            optimizer=foreign, noise_multiplier=1.0, noise_generator=torch.Generator(), **kwargs
        )
    # ... it comes before the other argument checks
    with pytest.raises(ValueError, match="Module parameters are different"):
        PrivacyEngine().make_private(
            optimizer=foreign, noise_multiplier=float("inf"), loss_reduction="avg", **kwargs
        )
    # module parameters the optimizer does not hold are fine
    partial = torch.optim.SGD(model[0].parameters(), lr=1)
    PrivacyEngine().make_private(optimizer=partial, noise_multiplier=1.0, **kwargs)


# ---------------------------------------------------------------- the recorded sample rate
@pytest.mark.parametrize("poisson_sampling", [True, False])
def test_user_dp_data_loader_is_accounted_at_its_own_rate(poisson_sampling):
    q, sigma = 0.35, 0.7
    loader = DPDataLoader(_dataset(), sample_rate=q, generator=torch.Generator().manual_seed(2))
    engine, _, (model, opt, dl) = _make_private(
        data_loader=loader, noise_multiplier=sigma, poisson_sampling=poisson_sampling
    )
    assert dl.sample_rate == q
    assert opt.expected_batch_size == round(q * N)
    steps = 0
    for _ in range(2):
        for x, y in dl:
            opt.zero_grad()
            _loss(model(x), y).backward()
            opt.step()
            steps += 1
    assert steps > 0
    assert engine.accountant.history == [(sigma, q, steps)]  # not 1 / round(1 / q) = 1 / 3


def test_make_private_with_epsilon_calibrates_at_the_real_rate():
    q, epochs, target, delta = 0.35, 3, 4.0, 1e-5
    loader = DPDataLoader(_dataset(), sample_rate=q, generator=torch.Generator().manual_seed(2))
    engine = PrivacyEngine(accountant="rdp")
    model = _mlp()
    model, opt, dl = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        target_epsilon=target,
        target_delta=delta,
        epochs=epochs,
        max_grad_norm=1.0,
    )
    want = get_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=q, epochs=epochs, accountant="rdp"
    )
    at_one_third = get_noise_multiplier(
        target_epsilon=target,
        target_delta=delta,
        sample_rate=1 / 3,
        epochs=epochs,
        accountant="rdp",
    )
    assert opt.noise_multiplier == want != at_one_third
    for _ in range(epochs):
        for x, y in dl:
            opt.zero_grad()
            _loss(model(x), y).backward()
            opt.step()
    (sigma, rate, steps), *rest = engine.accountant.history
    assert rest == [] and rate == q and sigma == want
    # calibrated for int(epochs / q) steps, get_noise_multiplier's own conversion
    assert steps <= int(epochs / q)
    assert engine.get_epsilon(delta) <= target


def _set_two_passes(model, batches):
    """p.grad_sample as GradSampleModule leaves it after two backward passes: a list of chunks."""
    reference = _mlp()  # the oracle runs on an unhooked copy with the same weights
    per_pass = [
        brute_force_grad_samples(reference, x, loss_fn=_loss, targets=y) for x, y in batches
    ]
    for name, p in model.named_parameters():
        p.grad_sample = [gs[name] for gs in per_pass]


def test_accountant_hook_records_rate_times_accumulated_passes():
    clip, lr, sigma = 0.3, 0.5, 0.0
    reference = _mlp()
    engine, raw, (model, opt, dl) = _make_private(
        poisson_sampling=False, max_grad_norm=clip, lr=lr, noise_multiplier=sigma
    )
    q = 1 / len(dl)
    x, y = _dataset().tensors
    batches = [(x[:10], y[:10]), (x[10:16], y[10:16])]
    _set_two_passes(raw, batches)
    assert opt.accumulated_iterations == 2
    opt.step()
    assert engine.accountant.history == [(sigma, 2 * q, 1)]
    # the mean scaling divides by expected_batch_size * accumulated passes
    sums = [_clipped_sum(reference, bx, by, clip) for bx, by in batches]
    for (name, p0), p in zip(reference.named_parameters(), raw.parameters()):
        want = p0 - lr * (sums[0][name] + sums[1][name]) / (opt.expected_batch_size * 2)
        torch.testing.assert_close(p.detach(), want.detach(), atol=1e-6, rtol=1e-5)


def test_two_backward_passes_then_one_step_end_to_end():
    # Needs GradSampleModule to keep each pass's rows apart (a list of per-pass tensors).
    lr = 0.5
    reference = _mlp()
    engine, raw, (model, opt, dl) = _make_private(
        poisson_sampling=False, max_grad_norm=999.0, lr=lr
    )
    x, y = _dataset().tensors
    opt.zero_grad()
    for sl in (slice(0, 10), slice(10, 20)):
        _loss(model(x[sl]), y[sl]).backward()
    assert opt.accumulated_iterations == 2
    opt.step()
    assert engine.accountant.history == [(0.0, 2 / len(dl), 1)]
    full = brute_force_grad_samples(reference, x[:20], loss_fn=_loss, targets=y[:20])
    for (name, p0), p in zip(reference.named_parameters(), raw.parameters()):
        torch.testing.assert_close(p.detach(), (p0 - lr * full[name].mean(0)).detach())


# ---------------------------------------------------------------- argument checks
@pytest.mark.parametrize("wrap_model", [True, False])
def test_wrapping_one_model_twice_is_refused_at_wrap_time(wrap_model):
    model = _mlp()
    _make_private(model=model, wrap_model=wrap_model)
    with pytest.raises(ValueError, match="already carries Opacus per-sample gradient hooks"):
        _make_private(model=model, wrap_model=wrap_model)


def test_model_hooked_by_grad_sample_module_is_refused_until_cleaned_up():
    model = _mlp()
    gsm = GradSampleModule(model)
    with pytest.raises(ValueError, match="already carries Opacus"):
        _make_private(model=model)
    gsm._close()
    _make_private(model=model)  # no hooks left: wrapping again is fine


def test_tensor_noise_multiplier_is_converted():
    engine, _, (model, opt, dl) = _make_private(noise_multiplier=torch.tensor(1.25))
    assert type(opt.noise_multiplier) is float and opt.noise_multiplier == 1.25
    x, y = next(iter(dl))
    opt.zero_grad()
    _loss(model(x), y).backward()
    opt.step()
    assert engine.accountant.history == [(1.25, 1 / len(dl), 1)]
    assert math.isfinite(engine.get_epsilon(1e-5))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(noise_multiplier=float("inf")), "noise_multiplier"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier"),
        (dict(noise_multiplier=-0.5), "noise_multiplier"),
        (dict(noise_multiplier=torch.tensor(float("inf"))), "noise_multiplier"),
        (dict(noise_multiplier=torch.ones(2)), "noise_multiplier"),
        (dict(max_grad_norm=float("inf")), "max_grad_norm"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=[1.0, float("inf"), 1.0, 1.0], clipping="per_layer"), "max_grad_norm"),
    ],
)
def test_non_finite_arguments_are_refused(kwargs, argument):
    with pytest.raises(ValueError, match=f"make_private: {argument}"):
        _make_private(**kwargs)


def test_non_numeric_noise_multiplier_is_a_type_error():
    with pytest.raises(TypeError, match="noise_multiplier"):
        _make_private(noise_multiplier="1.0")


@pytest.mark.parametrize("batch_size", [1, 8])
def test_empty_data_set_is_a_clear_error(batch_size):
    empty = DataLoader(TensorDataset(torch.zeros(0, DIM), torch.zeros(0)), batch_size=batch_size)
    model = _mlp()
    with pytest.raises(ValueError, match="empty"):
        PrivacyEngine().make_private_with_epsilon(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=empty,
            target_epsilon=1.0,
            target_delta=1e-5,
            epochs=1,
            max_grad_norm=1.0,
        )
    with pytest.raises(ValueError, match="empty"):
        _make_private(model=model, data_loader=empty)


def test_loss_reduction_is_checked_once_with_the_caller_named():
    with pytest.raises(ValueError, match="PrivacyEngine.make_private: loss_reduction='avg'"):
        _make_private(loss_reduction="avg")


# ---------------------------------------------------------------- the mode table
@pytest.mark.parametrize("name", sorted(GRAD_SAMPLE_MODES))
def test_table_is_what_the_factories_return(name):
    mode = grad_sample_mode_info(name)
    assert mode.name == name and get_gsm_class(name) is mode.module_class
    if mode.hooks_class is None:
        with pytest.raises(ValueError, match=repr(name)):
            get_hooks_class(name)
    else:
        assert get_hooks_class(name) is mode.hooks_class
    for clipping in ("flat", "per_layer", "adaptive"):
        if clipping not in mode.clippings:
            with pytest.raises(ValueError, match="clipping"):
                get_optimizer_class(clipping, False, name)
    optim = get_optimizer_class("flat", False, name)
    assert issubclass(optim, DPOptimizerFastGradientClipping) == mode.clips_in_backward
    assert mode.returns_criterion == mode.clips_in_backward == mode.hooks_take_max_grad_norm
    assert (optim is FSDPOptimizerFastGradientClipping) == mode.fsdp


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'jax'.*ghost_fsdp"):
        grad_sample_mode_info("jax")
    with pytest.raises(ValueError, match="'jax'"):
        _make_private(grad_sample_mode="jax")


@pytest.mark.parametrize("mode", ["ghost", "ghost_fsdp", "ghost_tp"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_every_ghost_mode_returns_the_dp_criterion_and_clips_at_max_grad_norm(mode, loss_reduction):
    clip, lr = 0.2, 0.5
    reference = _mlp()
    _, raw, out = _make_private(
        grad_sample_mode=mode, max_grad_norm=clip, lr=lr, loss_reduction=loss_reduction
    )
    assert len(out) == 4
    model, opt, criterion, dl = out
    assert isinstance(criterion, DPLossFastGradientClipping)
    assert isinstance(opt, DPOptimizerFastGradientClipping)
    assert model.max_grad_norm == clip == opt.max_grad_norm
    x, y = _dataset().tensors
    x, y = x[:7], y[:7]
    opt.zero_grad()
    criterion(model(x), y).backward()
    opt.step()
    sums = _clipped_sum(reference, x, y, clip)
    scale = opt.expected_batch_size if loss_reduction == "mean" else 1
    for (name, p0), p in zip(reference.named_parameters(), raw.parameters()):
        want = p0 - lr * sums[name] / scale
        torch.testing.assert_close(p.detach(), want.detach(), atol=1e-6, rtol=1e-5)


def test_ghost_fsdp_under_a_process_group_samples_per_rank():
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs a fresh torch.distributed")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        _, _, out = _make_private(grad_sample_mode="ghost_fsdp")
        model, opt, criterion, dl = out
        assert type(dl.batch_sampler).__name__ == "DistributedUniformWithReplacementSampler"
        assert isinstance(opt, FSDPOptimizerFastGradientClipping)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- Poisson accumulation
@pytest.mark.parametrize("wrap_model", [True, False])
def test_poisson_sampling_forbids_accumulation_even_without_wrapping(wrap_model):
    _, raw, (module, opt, dl) = _make_private(wrap_model=wrap_model)
    forward = module if wrap_model else raw
    x, y = _dataset().tensors
    _loss(forward(x[:4]), y[:4]).backward()
    with pytest.raises(ValueError, match="BatchMemoryManager"):
        _loss(forward(x[4:8]), y[4:8]).backward()


def test_without_poisson_accumulation_is_allowed():
    _, raw, (hooks, opt, dl) = _make_private(wrap_model=False, poisson_sampling=False)
    x, y = _dataset().tensors
    _loss(raw(x[:4]), y[:4]).backward()
    _loss(raw(x[4:8]), y[4:8]).backward()


def _train(max_physical):
    engine, raw, (model, opt, dl) = _make_private(
        data_loader=DataLoader(_dataset(), 10, generator=torch.Generator().manual_seed(4)),
        max_grad_norm=0.3,
    )
    physical = 0
    with (
        BatchMemoryManager(data_loader=dl, max_physical_batch_size=max_physical, optimizer=opt)
        if max_physical
        else contextlib.nullcontext(dl)
    ) as batches:
        for x, y in batches:
            opt.zero_grad()  # every physical step: summed_grad survives the skipped ones
            _loss(model(x), y).backward()
            opt.step()
            physical += 1
    return [p.detach().clone() for p in raw.parameters()], engine.accountant.history, physical


def test_bmm_with_zero_grad_every_physical_step_equals_plain_training():
    want, want_history, logical = _train(None)
    got, got_history, physical = _train(3)
    assert physical > logical
    assert got_history == want_history == [(0.0, 10 / N, logical)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

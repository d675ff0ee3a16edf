"""PrivacyEngine end to end, against the brute-force oracle, fresh accountants and dp_accounting."""

import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, DPPerLayerOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators.errors import UnsupportedModuleError
from tests.oracle import brute_force_grad_samples

N, BATCH, DIM, CLASSES = 64, 16, 6, 3


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def _dataset(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    w = torch.randn(DIM, CLASSES, generator=g)
    return TensorDataset(x, (x @ w).argmax(dim=1))


def _loader(n=N, batch=BATCH):
    return DataLoader(_dataset(n), batch_size=batch)


def _private(engine=None, *, model=None, lr=0.5, momentum=0.0, **kwargs):
    engine = engine or PrivacyEngine(accountant="rdp")
    model = model if model is not None else _mlp()
    kwargs.setdefault("noise_multiplier", 0.5)
    kwargs.setdefault("max_grad_norm", 1.0)
    out = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
        data_loader=kwargs.pop("data_loader", _loader()),
        **kwargs,
    )
    return (engine, *out)


def _full_loss(model):
    x, y = _dataset().tensors
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


# ---------------------------------------------------------------- end to end
def test_training_reduces_loss_and_accounts_every_step():
    engine, model, opt, dl = _private(
        noise_multiplier=0.3, noise_generator=torch.Generator().manual_seed(0)
    )
    assert isinstance(model, AbstractGradSampleModule) and isinstance(opt, DPOptimizer)
    assert isinstance(dl, DPDataLoader) and dl.sample_rate == pytest.approx(BATCH / N)
    assert opt.expected_batch_size == BATCH
    before = _full_loss(model)
    steps = 0
    for _ in range(8):
        for x, y in dl:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            steps += 1
    assert _full_loss(model) < 0.8 * before
    q = 1 / len(dl)
    assert engine.accountant.history == [(0.3, q, steps)]
    fresh = create_accountant("rdp")
    for _ in range(steps):
        fresh.step(noise_multiplier=0.3, sample_rate=q)
    assert engine.get_epsilon(1e-5) == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_matches_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    engine = PrivacyEngine(accountant="rdp")
    sigma, q, steps = 1.1, 0.01, 500
    for _ in range(steps):
        engine.accountant.step(noise_multiplier=sigma, sample_rate=q)
    ref = dp_accounting.rdp.RdpAccountant()
    ref.compose(
        dp_accounting.dp_event.PoissonSampledDpEvent(
            q, dp_accounting.dp_event.GaussianDpEvent(sigma)
        ),
        steps,
    )
    # Different order grids and RDP->DP conversions: agreement to a few percent.
    assert engine.get_epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=0.1)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_make_private_with_epsilon_lands_just_below_target(accountant):
    engine = PrivacyEngine(accountant=accountant)
    model = _mlp()
    target, delta, epochs = 3.0, 1e-5, 3
    model, opt, dl = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=_loader(),
        target_epsilon=target,
        target_delta=delta,
        epochs=epochs,
        max_grad_norm=1.0,
    )
    for _ in range(epochs):
        for x, y in dl:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert sum(h[2] for h in engine.accountant.history) == epochs * len(dl)
    eps = engine.get_epsilon(delta)
    assert 0.98 * target <= eps <= target, eps


def test_make_private_with_epsilon_warns_on_existing_history():
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.step(noise_multiplier=1.0, sample_rate=0.1)
    model = _mlp()
    with pytest.warns(UserWarning, match="history"):
        engine.make_private_with_epsilon(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=_loader(),
            target_epsilon=5.0,
            target_delta=1e-5,
            epochs=1,
            max_grad_norm=1.0,
        )


# ---------------------------------------------------------------- grad sample modes vs oracle
def _modes():
    modes = ["hooks", "functorch", "ghost"]
    try:
        from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights

        GradSampleModuleExpandedWeights(nn.Linear(2, 2))
        modes.append("ew")
    except Exception:  # expanded weights unavailable in this torch
        pass
    return modes


@pytest.mark.parametrize("mode", _modes())
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_update_equals_clip_and_sum_oracle(mode, loss_reduction):
    clip, lr = 0.2, 0.7
    x, y = _dataset().tensors
    x, y = x[:6], y[:6]  # the actual batch size differs from the expected one (16)
    reference = _mlp()
    out = _private(
        model=_mlp(),
        lr=lr,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        grad_sample_mode=mode,
        loss_reduction=loss_reduction,
    )
    if mode == "ghost":
        _, model, opt, criterion, _ = out
        assert isinstance(criterion, DPLossFastGradientClipping)
        assert isinstance(opt, DPOptimizerFastGradientClipping)
        loss = criterion(model(x), y)
    else:
        _, model, opt, _ = out
        loss = nn.functional.cross_entropy(model(x), y, reduction=loss_reduction)
    opt.zero_grad()
    loss.backward()
    opt.step()

    gs = brute_force_grad_samples(
        reference, x, targets=y, loss_fn=lambda o, t: nn.functional.cross_entropy(o, t)
    )
    names = [n for n, _ in reference.named_parameters()]
    norms = torch.cat([gs[n].flatten(1) for n in names], dim=1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    scale = BATCH if loss_reduction == "mean" else 1
    for (name, p0), p in zip(reference.named_parameters(), model.parameters()):
        expected = p0 - lr * torch.einsum("b,b...->...", factor, gs[name]) / scale
        torch.testing.assert_close(
            p.detach(), expected.detach(), atol=1e-5, rtol=1e-4, msg=lambda m: f"{mode}/{name}: {m}"
        )


def test_wrap_model_false_returns_hooks_and_trains():
    engine = PrivacyEngine(accountant="rdp")
    model = _mlp()
    hooks, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=_loader(),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        wrap_model=False,
    )
    assert hooks is not model and hooks._module is model
    x, y = next(iter(_loader()))
    nn.functional.cross_entropy(model(x), y).backward()
    assert model[0].weight.grad_sample.shape == (len(x), 8, DIM)
    opt.step()
    assert len(engine.accountant.history) == 1


# ---------------------------------------------------------------- configuration
def test_clipping_modes_select_optimizer():
    _, _, opt, _ = _private(clipping="per_layer", max_grad_norm=[1.0] * 4)
    assert isinstance(opt, DPPerLayerOptimizer)
    with pytest.raises(ValueError, match="clipping"):
        _private(clipping="bogus")


def test_expected_batch_size_is_rounded_sample_rate_times_dataset():
    _, _, opt, dl = _private(data_loader=_loader(n=100, batch=30))
    assert len(dl) == 4 and dl.sample_rate == 0.25
    assert opt.expected_batch_size == 25


def test_no_poisson_keeps_the_loader():
    loader = _loader()
    _, _, _, dl = _private(data_loader=loader, poisson_sampling=False)
    assert dl is loader


def test_existing_dp_optimizer_is_unwrapped():
    engine, model, opt, _ = _private()
    model2 = _mlp()
    inner = torch.optim.SGD(model2.parameters(), lr=0.1)
    dpopt = DPOptimizer(inner, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    _, opt2, _ = PrivacyEngine().make_private(
        module=model2,
        optimizer=dpopt,
        data_loader=_loader(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert opt2.original_optimizer is inner


def test_bmm_counts_logical_steps():
    engine, model, opt, dl = _private(noise_multiplier=0.0)
    with BatchMemoryManager(data_loader=dl, max_physical_batch_size=3, optimizer=opt) as pdl:
        n_physical = 0
        for x, y in pdl:
            assert len(x) <= 3
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            n_physical += 1
    assert n_physical > len(dl)
    assert engine.accountant.history == [(0.0, 1 / len(dl), len(dl))]


def _secure_engine():
    with pytest.warns(UserWarning, match="NOT cryptographically secure") as record:
        engine = PrivacyEngine(accountant="rdp", secure_mode=True)
    assert len(record) == 1
    return engine


def test_secure_mode_warns_once_and_is_unpredictable():
    batches = []
    for _ in range(2):
        engine = _secure_engine()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, at construction: not again per call
            _, model, opt, dl = _private(engine)
        assert opt.secure_mode
        assert isinstance(dl.batch_sampler.generator, torch.Generator)
        assert dl.batch_sampler.generator is engine.secure_rng
        batches.append([list(b) for b in dl.batch_sampler])
    assert batches[0] != batches[1]
    with pytest.raises(ValueError, match="noise_generator"):
        _private(_secure_engine(), noise_generator=torch.Generator())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrivacyEngine(accountant="rdp")  # no warning without secure mode


def test_secure_mode_docstring_says_what_it_protects_against():
    doc = " ".join(PrivacyEngine.__doc__.split())
    for fragment in (
        "not CSPRNGs",
        "OS CSPRNG",
        "floating-point",
        "guessable or reused seeds",
        "timing side channels",
    ):
        assert fragment in doc


def test_secure_mode_without_poisson_switches_generator():
    engine = _secure_engine()
    loader = DataLoader(_dataset(), batch_size=BATCH, shuffle=True)
    _, _, _, dl = _private(engine, data_loader=loader, poisson_sampling=False)
    assert dl.batch_sampler.sampler.generator is engine.secure_rng


# ---------------------------------------------------------------- errors
def test_batchnorm_model_is_rejected_and_fixable():
    model = nn.Sequential(nn.Linear(DIM, 8), nn.BatchNorm1d(8), nn.Linear(8, CLASSES))
    engine = PrivacyEngine()
    assert not engine.is_compatible(module=model, optimizer=None, data_loader=None)
    with pytest.raises(UnsupportedModuleError, match="BatchNorm"):
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=_loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    with pytest.raises(UnsupportedModuleError):
        engine.validate(module=model, optimizer=None, data_loader=None)
    fixed = PrivacyEngine.get_compatible_module(model)
    assert isinstance(model[1], nn.BatchNorm1d), "the original model must not be modified"
    assert engine.is_compatible(module=fixed, optimizer=None, data_loader=None)
    engine.make_private(
        module=fixed,
        optimizer=torch.optim.SGD(fixed.parameters(), lr=0.1),
        data_loader=_loader(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )


def test_optimizer_params_must_belong_to_module():
    model, other = _mlp(), _mlp(seed=3)
    with pytest.raises(
        ValueError, match="Module parameters are different than optimizer Parameters"
    ):
        PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=1),
            data_loader=_loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_reduction"):
        _private(loss_reduction="avg")
    with pytest.raises(ValueError, match="ghost"):
        _private(grad_sample_mode="ghost", clipping="per_layer", max_grad_norm=[1.0] * 4)
    with pytest.raises(ValueError):
        _private(grad_sample_mode="no_such_mode")
    with pytest.raises(ValueError):
        PrivacyEngine(accountant="no_such_accountant")


def test_rewrapping_with_other_settings_is_an_error():
    engine, model, _, _ = _private()
    with pytest.raises(ValueError, match="batch_first"):
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=_loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            batch_first=False,
        )


def test_parameter_added_after_make_private_fails_at_step():
    _, model, opt, dl = _private()
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})
    x, y = next(iter(dl))
    (nn.functional.cross_entropy(model(x), y) + extra.sum()).backward()
    with pytest.raises(ValueError, match="grad_sample"):
        opt.step()


def test_poisson_batches_match_sampler():
    model = _mlp()
    engine = PrivacyEngine(accountant="rdp")
    _, _, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(
            _dataset(), batch_size=BATCH, generator=torch.Generator().manual_seed(3)
        ),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    ref = UniformWithReplacementSampler(
        num_samples=N, sample_rate=BATCH / N, generator=torch.Generator().manual_seed(3)
    )
    x_all = _dataset().tensors[0]
    for (x, _), idx in zip(dl, ref):
        torch.testing.assert_close(x, x_all[idx])

"""The library on an accelerator: per-sample gradients, ``make_private`` steps, noise, correlated
noise, mixed precision and the release-once refusals, each against an oracle run on the same
device.

The device is ``$OPACUS_TEST_DEVICE``; without it, ``cuda`` when available, else the whole module
is skipped (CI has no GPU). ``OPACUS_TEST_DEVICE=cpu`` runs everything on the CPU, to debug the
file without a GPU. Oracles: the brute-force per-sample loop of ``tests.oracle`` (one
``torch.autograd.grad`` per sample), closed-form noise moments, and the torch reference modules.

Float32 comparisons run with TF32 off (``allow_tf32 = False`` for cuBLAS and cuDNN, restored
after each test): with TF32 a matmul keeps 10 mantissa bits, and the batched kernels and the
per-sample loop would differ by ~1e-3 relative for reasons unrelated to the library. The
remaining tolerance (``RTOL``/``ATOL``) covers float32 summation order, which differs between a
batched kernel and a batch of one on a GPU.
"""

import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

_REQUESTED = os.environ.get("OPACUS_TEST_DEVICE")
if _REQUESTED is None and not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device (set OPACUS_TEST_DEVICE=cpu to run these tests on the CPU)",
        allow_module_level=True,
    )
DEV = torch.device(_REQUESTED or "cuda")
if DEV.type == "cuda" and not torch.cuda.is_available():
    pytest.skip(f"OPACUS_TEST_DEVICE={DEV} but CUDA is not available", allow_module_level=True)

from opacus import PrivacyEngine  # noqa: E402
from opacus.grad_sample import (  # noqa: E402
    GradSampleModule,
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.gsm_exp_weights import _call_for_per_sample_grads  # noqa: E402
from opacus.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from opacus.optimizers.correlated_noise import BandedMatrixFactorizationNoise  # noqa: E402
from opacus.optimizers.noise import SECURE_RESAMPLING_N  # noqa: E402,F401
from opacus.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402
from opacus.utils.fast_gradient_clipping_utils import double_backward  # noqa: E402
from tests.grad_samples.ghost_stubs import BoundOnly  # noqa: E402
from tests.grad_samples.test_mixed_precision import BF16_RTOL, ConvNet, TokenNet  # noqa: E402
from tests.oracle import brute_force_grad_samples, grad_samples_of  # noqa: E402

try:
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover - transformers is optional
    HFConv1D = None

RTOL, ATOL = 1e-3, 1e-4
B = 4


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _close(actual, expected, what, rtol=RTOL, atol=ATOL):
    assert actual.device.type == DEV.type, f"{what}: on {actual.device}, expected {DEV}"
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {expected.shape}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- layer matrix
class _Rec(nn.Module):
    """A DP recurrent layer with a linear head on every step (tuple outputs dropped)."""

    def __init__(self, cls, batch_first):
        super().__init__()
        self.rnn = cls(3, 4, batch_first=batch_first)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class _Attn(nn.Module):
    """Self-attention with bias_kv (its SequenceBias sampler too) and a linear head."""

    def __init__(self, batch_first):
        super().__init__()
        self.attn = DPMultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])


def _floats(*shape):
    return lambda: torch.randn(*shape)


def _ids(*shape):
    return lambda: torch.randint(0, 10, shape)


# name -> (model factory, input factory, batch_first)
LAYERS = {
    "linear": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)),
        _floats(B, 2, 5),
        True,
    ),
    "linear_time_major": (lambda: nn.Linear(5, 3), _floats(3, B, 5), False),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), _floats(B, 3, 7), True),
    "conv2d": (
        lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2),
        _floats(B, 2, 6, 5),
        True,
    ),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, padding=1), _floats(B, 2, 3, 4, 3), True),
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 4), nn.Tanh()), _ids(B, 5), True),
    "embedding_time_major": (lambda: nn.Embedding(10, 4), _ids(5, B), False),
    "embedding_bag": (lambda: nn.EmbeddingBag(10, 4, mode="mean"), _ids(B, 5), True),
    "layer_norm": (lambda: nn.LayerNorm(6), _floats(B, 3, 6), True),
    "group_norm": (lambda: nn.GroupNorm(2, 4), _floats(B, 4, 5), True),
    "instance_norm1d": (lambda: nn.InstanceNorm1d(4, affine=True), _floats(B, 4, 5), True),
    "instance_norm2d": (lambda: nn.InstanceNorm2d(3, affine=True), _floats(B, 3, 4, 4), True),
    "instance_norm3d": (lambda: nn.InstanceNorm3d(2, affine=True), _floats(B, 2, 3, 3, 3), True),
    "rms_norm": (lambda: nn.RMSNorm(6), _floats(B, 3, 6), True),
    "dplstm": (lambda: _Rec(DPLSTM, True), _floats(B, 5, 3), True),
    "dplstm_time_major": (lambda: _Rec(DPLSTM, False), _floats(5, B, 3), False),
    "dpgru": (lambda: _Rec(DPGRU, True), _floats(B, 5, 3), True),
    "dprnn_time_major": (lambda: _Rec(DPRNN, False), _floats(5, B, 3), False),
    "dpmha_batch_first": (lambda: _Attn(True), _floats(B, 5, 8), True),
    "dpmha_seq_first": (lambda: _Attn(False), _floats(5, B, 8), False),
}
if HFConv1D is not None:
    LAYERS["hf_conv1d"] = (lambda: nn.Sequential(HFConv1D(4, 6), nn.Tanh()), _floats(B, 3, 6), True)


def _case(name):
    make_model, make_input, batch_first = LAYERS[name]
    torch.manual_seed(0)
    model = make_model()
    with torch.no_grad():  # norm layers start at 1 / 0: random values expose a wrong formula
        for p in model.parameters():
            p.normal_()
    return model.to(DEV), make_input().to(DEV), batch_first


def _sample_losses(out, batch_dim):
    return out.pow(2).movedim(batch_dim, 0).flatten(1).sum(1)


def _oracle(model, x, batch_first):
    return brute_force_grad_samples(
        model, x, batch_dim=0 if batch_first else 1, loss_fn=lambda out: out.pow(2).sum()
    )


def _total_norms(per_sample):
    return torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_grad_samples_on_device(name, mode, reduction):
    model, x, batch_first = _case(name)
    expected = _oracle(model, x, batch_first)
    gsm = GradSampleModule(
        model,
        batch_first=batch_first,
        loss_reduction=reduction,
        force_functorch=(mode == "functorch"),
    )
    losses = _sample_losses(gsm(x), 0 if batch_first else 1)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    actual = grad_samples_of(gsm)
    assert set(actual) == set(expected)
    for n, e in expected.items():
        _close(actual[n], e, f"{name}/{mode}/{n}")
    gsm.remove_hooks()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_ghost_norms_and_clipped_sum_on_device(name):
    model, x, batch_first = _case(name)
    batch_dim = 0 if batch_first else 1
    expected = _oracle(model, x, batch_first)
    norms = _total_norms(expected)
    # per-sample norms: one backward with the norm hooks
    gsm = GradSampleModuleFastGradientClipping(
        copy.deepcopy(model), batch_first=batch_first, loss_reduction="sum", max_grad_norm=1.0
    )
    _sample_losses(gsm(x), batch_dim).sum().backward()
    _close(gsm.get_norm_sample(), norms, f"{name}/ghost norms")
    gsm.remove_hooks()
    # clipped sum: the two passes (or book-keeping), clip bound between the smallest and largest
    bound = float(norms.median())
    coef = (bound / (norms + 1e-6)).clamp(max=1.0)
    clipped = copy.deepcopy(model)
    gsm = GradSampleModuleFastGradientClipping(
        clipped, batch_first=batch_first, loss_reduction="sum", max_grad_norm=bound
    )
    double_backward(gsm, BoundOnly(bound), _sample_losses(gsm(x), batch_dim))
    for n, p in clipped.named_parameters():
        want = torch.einsum("b,b...->...", coef, expected[n])
        _close(p.grad, want, f"{name}/ghost clipped sum/{n}")
    gsm.remove_hooks()


# ----------------------------------------------------------------------------- make_private
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 3))


def _dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def _make_private(mode, model, loader, **kw):
    engine = PrivacyEngine(
        accountant=kw.pop("accountant", "rdp"), secure_mode=kw.pop("secure", False)
    )
    opt_cls = kw.pop("optimizer_cls", torch.optim.SGD)
    opt_kw = kw.pop("optimizer_kw", dict(lr=0.1))
    out = engine.make_private(
        module=model,
        optimizer=opt_cls(model.parameters(), **opt_kw),
        data_loader=loader,
        grad_sample_mode=mode,
        **kw,
    )
    criterion = out[2] if mode == "ghost" else nn.CrossEntropyLoss()
    return engine, out[0], out[1], criterion, out[-1]


def _modes():
    modes = ["hooks", "functorch", "ghost"]
    if _call_for_per_sample_grads() is not None:
        modes.insert(2, "ew")
    return modes


@pytest.mark.parametrize("mode", _modes())
def test_make_private_poisson_bmm_trains_on_device(mode):
    model = _mlp().to(DEV)
    loader = DataLoader(_dataset(), batch_size=16)
    engine, module, opt, criterion, dl = _make_private(
        mode,
        model,
        loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
        optimizer_cls=torch.optim.Adam,
        optimizer_kw=dict(lr=1e-2),
        noise_generator=_gen(0),
    )
    before = [p.detach().clone() for p in module.parameters()]
    steps = 0
    physical = 16 if mode == "ew" else 5  # ew: no virtual steps needed to cover it
    with BatchMemoryManager(data_loader=dl, max_physical_batch_size=physical, optimizer=opt) as bm:
        for x, y in bm:
            x, y = x.to(DEV), y.to(DEV)
            opt.zero_grad()
            criterion(module(x), y).backward()
            opt.step()
            steps += not opt._is_last_step_skipped
    assert steps > 0
    for p, b in zip(module.parameters(), before):
        assert p.device.type == DEV.type
        assert not torch.equal(p.detach(), b), "the parameters did not move"
        assert torch.isfinite(p).all()
    state = [
        t for s in opt.original_optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    ]
    assert state, "Adam kept no state"
    for t in state:
        if t.dim() > 0:  # Adam's step counter may live on the CPU (torch's capturable=False)
            assert t.device.type == DEV.type, f"optimizer state on {t.device}"
    eps = engine.accountant.get_epsilon(1e-5)
    assert math.isfinite(eps) and eps > 0
    assert len(engine.accountant.history) > 0


@pytest.mark.parametrize("clipping", ["per_layer", "adaptive"])
def test_other_clipping_modes_step_on_device(clipping):
    model = _mlp().to(DEV)
    kw = dict(max_grad_norm=1.0)
    if clipping == "per_layer":
        kw["max_grad_norm"] = [1.0] * len(list(model.parameters()))
    else:
        kw.update(
            target_unclipped_quantile=0.5,
            clipbound_learning_rate=0.2,
            max_clipbound=10.0,
            min_clipbound=0.1,
            unclipped_num_std=10.0,
        )
    engine, module, opt, criterion, dl = _make_private(
        "hooks",
        model,
        DataLoader(_dataset(), batch_size=16),
        noise_multiplier=1.0,
        poisson_sampling=True,
        clipping=clipping,
        noise_generator=_gen(0),
        **kw,
    )
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in dl:
        opt.zero_grad()
        criterion(module(x.to(DEV)), y.to(DEV)).backward()
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert p.device.type == DEV.type and torch.isfinite(p).all()
        assert not torch.equal(p.detach(), b)
    if clipping == "adaptive":
        assert 0.1 <= opt.max_grad_norm <= 10.0
    assert math.isfinite(engine.accountant.get_epsilon(1e-5))


def _clipped_mean_oracle(model, x, y, max_grad_norm):
    per_sample = brute_force_grad_samples(model, x, targets=y, loss_fn=F.cross_entropy)
    coef = (max_grad_norm / (_total_norms(per_sample) + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", coef, g) / x.shape[0] for n, g in per_sample.items()}


@pytest.mark.parametrize("mode", _modes())
def test_noise_free_step_is_the_clipped_mean(mode):
    model = _mlp().to(DEV)
    ds = _dataset(16)
    x, y = ds.tensors[0].to(DEV), ds.tensors[1].to(DEV)
    C = 0.5
    expected = _clipped_mean_oracle(model, x, y, C)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, module, opt, criterion, _ = _make_private(
        mode,
        model,
        DataLoader(ds, batch_size=16),
        noise_multiplier=0.0,
        max_grad_norm=C,
        poisson_sampling=False,
        optimizer_kw=dict(lr=1.0),
    )
    opt.zero_grad()
    criterion(module(x), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        _close(before[n] - p.detach(), expected[n], f"{mode}/{n}", rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- noise
def _zero_grad_model(d_in=500, d_out=200):
    """Linear without bias on zero inputs: every per-sample gradient is exactly zero, so a
    step's gradient is pure noise."""
    return nn.Linear(d_in, d_out, bias=False).to(DEV)


def _noise_after_one_step(generator=None, *, sigma=1.3, C=0.7, ebs=8, secure=False):
    model = _zero_grad_model()
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=C,
        expected_batch_size=ebs,
        generator=generator,
        secure_mode=secure,
    )
    gsm = GradSampleModule(model)
    gsm(torch.zeros(ebs, model.in_features, device=DEV)).sum().div(ebs).backward()
    opt.step()
    return model.weight.grad.detach().clone()


def _assert_std(noise, std):
    assert noise.device.type == DEV.type
    n = noise.numel()
    v = noise.double().flatten()
    assert abs(v.mean().item()) < 5 * std / math.sqrt(n), "noise mean"
    se = std / math.sqrt(2 * n)  # standard error of the sample std of a Gaussian
    assert abs(v.std().item() - std) < 5 * se, (v.std().item(), std, se)


def test_seeded_noise_is_reproducible_and_has_the_right_std():
    a = _noise_after_one_step(_gen(3))
    b = _noise_after_one_step(_gen(3))
    c = _noise_after_one_step(_gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    _assert_std(a, 1.3 * 0.7 / 8)


def test_make_private_with_a_device_generator_is_reproducible():
    def run():
        model = _mlp().to(DEV)
        _, module, opt, criterion, dl = _make_private(
            "hooks",
            model,
            DataLoader(_dataset(), batch_size=16),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            noise_generator=_gen(11),
        )
        for x, y in dl:
            opt.zero_grad()
            criterion(module(x.to(DEV)), y.to(DEV)).backward()
            opt.step()
        return [p.detach().clone() for p in module.parameters()]

    first, second = run(), run()
    for a, b in zip(first, second):
        # The noise is bit-identical; the tolerance only admits atomics-order differences of the
        # backward kernels on a GPU (the noise std, ~0.1 / 16 per step, is far above it).
        _close(a, b, "reproducible run", rtol=1e-5, atol=1e-6)
    assert not torch.equal(first[0], _mlp().to(DEV)[0].weight.detach())


def test_secure_mode_noise_on_device():
    noise = _noise_after_one_step(None, secure=True)
    _assert_std(noise, 1.3 * 0.7 / 8)
    # and through the engine, with its securely seeded Poisson loader
    model = nn.Linear(8, 3, bias=False).to(DEV)
    ds = TensorDataset(torch.zeros(64, 8), torch.randint(0, 3, (64,)))
    engine, module, opt, criterion, dl = _make_private(
        "hooks",
        model,
        DataLoader(ds, batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
        secure=True,
    )
    for x, y in dl:
        opt.zero_grad()
        criterion(module(x.to(DEV)), y.to(DEV)).backward()
        opt.step()
        assert model.weight.grad.device.type == DEV.type
        assert torch.isfinite(model.weight).all()
    with pytest.raises(ValueError, match="noise_generator"):
        PrivacyEngine(secure_mode=True).make_private(
            module=nn.Linear(8, 3).to(DEV),
            optimizer=torch.optim.SGD(nn.Linear(8, 3).parameters(), lr=0.1),
            data_loader=DataLoader(ds, batch_size=16),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            noise_generator=_gen(0),
        )
    assert math.isfinite(engine.accountant.get_epsilon(1e-5))


# ----------------------------------------------------------------------------- correlated noise
def _dense_c(coeffs, horizon):
    c = torch.zeros(horizon, horizon, dtype=torch.float64)
    for i in range(horizon):
        for j, cj in enumerate(coeffs):
            if i - j >= 0:
                c[i, i - j] = cj
    return c


def test_banded_mf_stream_on_device_has_the_factorization_covariance():
    # The code makes no promise that a device generator reproduces the CPU stream (Philox vs
    # Mersenne Twister), so the check is statistical: Cov(w) = (std ||C||_col)^2 C^-1 C^-T.
    T, n, std = 6, 100_000, 1.3
    mech = BandedMatrixFactorizationNoise(bands=3)
    g = _gen(0)
    zeros = [torch.zeros(n, dtype=torch.float64, device=DEV)]
    w = torch.stack([next(mech.with_noise(std, zeros, generator=g))[1] for _ in range(T)])
    assert w.device.type == DEV.type
    assert all(t.device.type == DEV.type for step in mech._history for t in step)
    w = w.cpu()
    cinv = torch.linalg.inv(_dense_c(mech.coefficients, T))
    expected = (std * mech.column_norm) ** 2 * cinv @ cinv.T
    empirical = w @ w.T / n
    se = ((expected.diag()[:, None] * expected.diag()[None, :] + expected**2) / n).sqrt()
    assert ((empirical - expected).abs() <= 5 * se).all(), (empirical - expected) / se
    # same seed, same device: the same stream
    again = BandedMatrixFactorizationNoise(bands=3)
    g2 = _gen(0)
    w2 = torch.stack([next(again.with_noise(std, zeros, generator=g2))[1] for _ in range(T)])
    assert torch.equal(w, w2.cpu())


def test_banded_mf_engine_run_on_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 300), nn.ReLU(), nn.Linear(300, 3)).to(DEV)
    ds = _dataset(48)

    def run(noise):
        m = copy.deepcopy(model)
        engine, module, opt, criterion, dl = _make_private(
            "hooks",
            m,
            DataLoader(ds, batch_size=8, generator=torch.Generator().manual_seed(1)),
            noise_multiplier=noise,
            max_grad_norm=0.5,
            noise_mechanism="banded_mf",
            bands=3,
            optimizer_kw=dict(lr=0.0),
            noise_generator=_gen(7),
        )
        grads = []
        for x, y in dl:
            opt.zero_grad()
            criterion(module(x.to(DEV)), y.to(DEV)).backward()
            opt.step()
            if not opt._is_last_step_skipped:
                grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
        return opt, torch.stack(grads)

    opt, noisy = run(1.5)
    _, clean = run(0.0)
    T = noisy.shape[0]
    assert T == opt.noise_mechanism.steps == 6
    for step in opt.noise_mechanism.state_dict()["history"]:
        assert all(t.device.type == DEV.type for t in step)
    w = ((noisy - clean) * opt.expected_batch_size).double().cpu()  # (T, n): the streamed noise
    z = _dense_c(opt.noise_mechanism.coefficients, T) @ w  # i.i.d. N(0, (std ||C||)^2) rows
    target = 1.5 * 0.5 * opt.noise_mechanism.column_norm
    n = z.numel()
    assert abs(z.std().item() - target) < 5 * target / math.sqrt(2 * n)
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 * target**2 / math.sqrt(z[1:].numel())
    # whereas w itself is correlated across steps: E[w_1 w_0] = -c_1 (std ||C||)^2
    lag1 = (w[1] * w[0]).mean().item()
    want = -opt.noise_mechanism.coefficients[1] * target**2
    assert abs(lag1 - want) < 5 * target**2 * math.sqrt(2 / w.shape[1])


# ----------------------------------------------------------------------------- mixed precision
# The models and tolerance of the CPU suite's mixed-precision tests.
_TokenNet, _ConvNet = TokenNet, ConvNet


def _rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _sq_loss(out):
    return out.float().pow(2).sum()


@pytest.mark.parametrize(
    "make",
    [
        lambda: (_TokenNet(), torch.randint(0, 20, (6, 5))),
        lambda: (_ConvNet(), torch.randn(6, 2, 5, 5)),
    ],
    ids=["tokens", "conv"],
)
def test_bf16_autocast_hooks_grad_samples_match_float32_oracle(make):
    torch.manual_seed(0)
    model, x = make()
    model, x = model.to(DEV), x.to(DEV)
    expected = brute_force_grad_samples(model, x, loss_fn=_sq_loss)
    gsm = GradSampleModule(model, loss_reduction="sum")
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        out = gsm(x)
    assert out.dtype == torch.bfloat16
    _sq_loss(out).backward()
    for n, p in model.named_parameters():
        gs = p.grad_sample
        assert gs.device.type == DEV.type and gs.dtype == torch.float32, (n, gs.device, gs.dtype)
        assert torch.isfinite(gs).all(), n
        assert _rel_err(gs, expected[n]) < BF16_RTOL, n


def test_bf16_autocast_ghost_norms_match_float32_oracle():
    torch.manual_seed(1)
    model, x = _TokenNet().to(DEV), torch.randint(0, 20, (6, 5), device=DEV)
    norms = _total_norms(brute_force_grad_samples(model, x, loss_fn=_sq_loss))
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=1.0)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        out = gsm(x)
    _sq_loss(out).backward()
    got = gsm.get_norm_sample()
    assert got.dtype == torch.float32 and got.device.type == DEV.type
    torch.testing.assert_close(got, norms.float(), rtol=BF16_RTOL, atol=1e-4)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_bf16_autocast_make_private_step(mode):
    model = _TokenNet().to(DEV)
    ds = TensorDataset(torch.randint(0, 20, (32, 5)), torch.randint(0, 3, (32,)))
    _, module, opt, criterion, dl = _make_private(
        mode,
        model,
        DataLoader(ds, batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
        noise_generator=_gen(0),
    )
    for x, y in dl:
        opt.zero_grad()
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            out = module(x.to(DEV))
        criterion(out.float(), y.to(DEV)).backward()
        opt.step()
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.device.type == DEV.type
        assert torch.isfinite(p).all()


# ----------------------------------------------------------------------------- release once
@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_two_steps_after_one_backward_are_refused_on_device(mode):
    model = _mlp().to(DEV)
    ds = _dataset(16)
    _, module, opt, criterion, _ = _make_private(
        mode,
        model,
        DataLoader(ds, batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        noise_generator=_gen(0),
    )
    x, y = ds.tensors[0].to(DEV), ds.tensors[1].to(DEV)
    opt.zero_grad()
    criterion(module(x), y).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="already used by an earlier optimizer step"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # model.zero_grad() instead of optimizer.zero_grad() is refused too
    module.zero_grad()
    criterion(module(x), y).backward()
    with pytest.raises(ValueError, match="optimizer.zero_grad"):
        opt.step()

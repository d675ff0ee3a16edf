"""``compute_batch_gradients = False``: hooked parameters stay out of the autograd graph, so the
backward computes per-sample gradients (equal to the brute-force oracle) and no ``p.grad``."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleHooks, GradSampleModule
from tests.grad_samples.test_ghost_first_pass import CASES, _case, _sample_loss
from tests.oracle import brute_force_grad_samples


class _Conv(nn.Module):
    """A first convolution (input needs no gradient) then a layer with no grad sampler."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.scale = _Scale(3 * 4 * 4)
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.head(self.scale(F.relu(self.conv(x)).flatten(1)))


class _Scale(nn.Module):
    """No registered grad sampler: the torch.func fallback computes its per-sample gradients."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.emb(idx)))


def _models():
    torch.manual_seed(0)
    cases = {name: _case(name) for name in CASES}
    cases["conv_fallback"] = (_Conv(), torch.randn(3, 2, 6, 6), 0)
    cases["tied"] = (_Tied(), torch.randint(0, 7, (3, 5)), 0)
    return cases


def _backward(model, x, batch_dim, compute_batch_gradients):
    gsm = GradSampleModule(model, batch_first=batch_dim == 0, loss_reduction="sum")
    gsm.compute_batch_gradients = compute_batch_gradients
    _sample_loss(gsm(x), batch_dim).sum().backward()
    return gsm


@pytest.mark.parametrize("name", [*CASES, "conv_fallback", "tied"])
def test_per_sample_gradients_match_oracle_without_batch_gradients(name):
    model, x, batch_dim = _models()[name]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    expected = brute_force_grad_samples(
        model, x, batch_dim=batch_dim, loss_fn=lambda out: _sample_loss(out, batch_dim).sum()
    )
    autograd_param_grads = []
    for p in trainable.values():
        p.register_hook(lambda g: autograd_param_grads.append(g))
    input_grad = None
    if x.requires_grad:
        (reference_input_grad,) = torch.autograd.grad(_sample_loss(model(x), batch_dim).sum(), [x])
        autograd_param_grads.clear()
    gsm = _backward(model, x, batch_dim, compute_batch_gradients=False)
    assert autograd_param_grads == []  # no weight-gradient product ran
    for n, p in trainable.items():
        assert p.grad is None, n
        assert p.requires_grad, n  # restored after every forward
        torch.testing.assert_close(p.grad_sample, expected[n], rtol=1e-4, atol=1e-6)
    assert all(not p.requires_grad and getattr(p, "grad_sample", None) is None for p in frozen)
    if x.requires_grad:
        input_grad = x.grad
        torch.testing.assert_close(input_grad, reference_input_grad, rtol=1e-5, atol=1e-6)
    gsm.remove_hooks()


def test_the_default_keeps_batch_gradients():
    model, x, batch_dim = _models()["mlp"]
    assert GradSampleModule.compute_batch_gradients and GradSampleHooks.compute_batch_gradients
    expected = {
        n: g.sum(0)
        for n, g in brute_force_grad_samples(
            model, x, loss_fn=lambda out: _sample_loss(out, batch_dim).sum()
        ).items()
    }
    _backward(model, x, batch_dim, compute_batch_gradients=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6)


class _Fails(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.shape[0] == 1:
            raise RuntimeError("boom")
        return self.fc(x)


def test_requires_grad_is_restored_when_the_forward_raises_and_untouched_in_eval():
    model = nn.Sequential(_Fails())
    gsm = GradSampleModule(model)
    gsm.compute_batch_gradients = False
    seen = []
    model[0].fc.register_forward_pre_hook(
        lambda m, _: seen.append(m.weight.requires_grad), prepend=False
    )
    with pytest.raises(RuntimeError, match="boom"):
        gsm(torch.randn(1, 3))
    assert all(p.requires_grad for p in model.parameters())
    gsm(torch.randn(2, 3))
    assert seen[-1] is False  # switched off inside the layer's forward
    model.eval()
    gsm(torch.randn(2, 3))
    assert seen[-1] is True  # eval: nothing to compute, nothing switched
    model.train()
    with torch.no_grad():
        gsm(torch.randn(2, 3))
    assert seen[-1] is True


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_privacy_engine_skips_batch_gradients_for_hooks_modes(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    x, y = data[:4]
    # The oracle runs on the model before the engine hooks it.
    per_sample = brute_force_grad_samples(
        model, x, targets=y, loss_fn=lambda o, t: F.cross_entropy(o, t)
    )
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
    coef = (1e-2 / (norms + 1e-6)).clamp(max=1.0)
    assert (coef < 1).all()
    out = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data, batch_size=4),
        noise_multiplier=0.0,
        max_grad_norm=1e-2,
        poisson_sampling=False,
        grad_sample_mode=mode,
        criterion=nn.CrossEntropyLoss(),
    )
    module, optimizer = out[0], out[1]
    assert module.compute_batch_gradients is (mode == "ghost")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    criterion = out[2] if mode == "ghost" else nn.CrossEntropyLoss()
    criterion(module(x), y).backward()
    if mode != "ghost" and module._batch_gradient_switch is not None:  # torch >= 2.1
        assert all(p.grad is None for p in model.parameters())
    optimizer.step()
    for n, p in model.named_parameters():
        clipped_mean = torch.einsum("b,b...->...", coef, per_sample[n]) / 4
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * clipped_mean, rtol=1e-4, atol=1e-6)


def test_ghost_clipping_never_switches_parameters_off():
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = nn.Sequential(nn.Linear(3, 2))
    gsm = GradSampleModuleFastGradientClipping(model)
    assert gsm._batch_gradient_switch is None
    seen = []
    model[0].register_forward_pre_hook(lambda m, _: seen.append(m.weight.requires_grad))
    gsm.compute_batch_gradients = False  # ignored: the second pass needs p.grad
    gsm(torch.randn(2, 3))
    assert seen == [True]


class _CalledTwice(nn.Module):
    """One layer, two calls; only one call's output reaches the loss."""

    def __init__(self, live_first: bool):
        super().__init__()
        self.live_first = live_first
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        first, second = self.fc(x), self.fc(2 * x + 1)
        return first if self.live_first else second


@pytest.mark.parametrize("compute_batch_gradients", [True, False])
@pytest.mark.parametrize(
    "build",
    [
        lambda: _CalledTwice(live_first=True),
        lambda: _CalledTwice(live_first=False),
        lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)),
    ],
    ids=["dead_last_call", "dead_first_call", "inplace_relu_after_first_layer"],
)
def test_each_output_hook_pairs_with_its_own_call(build, compute_batch_gradients):
    """A call whose output the loss ignores contributes nothing, and never lends its inputs to
    another call's gradient; an in-place op after a hooked layer is allowed."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(5, 3)
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.compute_batch_gradients = compute_batch_gradients
    gsm(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[n], rtol=1e-5, atol=1e-6)


def test_grad_path_covers_tuple_outputs_and_leaves_the_rest():
    from opacus.grad_sample.batch_gradients import _with_grad_path

    anchor = torch.zeros((), requires_grad=True)
    a, b = torch.randn(2, 3), torch.arange(3)
    out = _with_grad_path((a, b, None), anchor)
    assert isinstance(out, tuple) and out[0].requires_grad and out[2] is None
    assert out[1] is b  # integer tensors cannot require grad
    torch.testing.assert_close(out[0], a)
    (g,) = torch.autograd.grad(out[0].sum() * 3, [out[0]])
    torch.testing.assert_close(g, torch.full_like(a, 3.0))
    assert _with_grad_path("text", anchor) == "text"

"""The torch.func fallback: per-sample gradients of arbitrary layers vs the brute-force oracle."""

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModule, wrap_model
from opacus.grad_sample.functorch import (
    ft_compute_per_sample_gradient,
    make_functional,
    per_sample_gradient,
    prepare_layer,
)
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples, grad_samples_of


def _layer_grad_samples(layer, x, batch_first=True):
    """Run the fallback directly on one layer: backprops are those of loss = sum(output)."""
    out = layer(x)
    backprops = torch.ones_like(out)
    if not batch_first:
        x, backprops = x.movedim(1, 0), backprops.movedim(1, 0)
    prepare_layer(layer, batch_first=batch_first)
    per_param = ft_compute_per_sample_gradient(layer, [x], backprops)
    names = {p: n for n, p in layer.named_parameters()}
    return {names[p]: g for p, g in per_param.items()}


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.PReLU(3), (4, 3, 5)),
        (nn.ConvTranspose2d(2, 3, kernel_size=2, stride=2), (3, 2, 3, 3)),
        (nn.Linear(4, 2), (5, 6, 4)),
        (nn.Bilinear(3, 3, 2), None),
    ],
)
def test_layers_match_brute_force(layer, shape):
    torch.manual_seed(0)
    if shape is None:  # two inputs
        x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
        expected = brute_force_grad_samples(layer, (x1, x2))
        out = layer(x1, x2)
        per_param = ft_compute_per_sample_gradient(layer, [x1, x2], torch.ones_like(out))
        names = {p: n for n, p in layer.named_parameters()}
        actual = {names[p]: g for p, g in per_param.items()}
    else:
        x = torch.randn(*shape)
        expected = brute_force_grad_samples(layer, x)
        actual = _layer_grad_samples(layer, x)
    assert_grad_samples_close(actual, expected)


def test_time_major_layer():
    """batch_first=False: each sample is re-inserted on dim 1, where the layer expects it."""

    class TimeCumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x.cumsum(dim=0) * self.weight

    torch.manual_seed(1)
    layer = TimeCumsum()
    x = torch.randn(5, 4, 3)  # (T, B, F)
    expected = brute_force_grad_samples(layer, x, batch_dim=1)
    assert_grad_samples_close(_layer_grad_samples(layer, x, batch_first=False), expected)
    # Same tensors, but told the layer is batch-first: the sample lands on dim 0 and the time
    # mixing sees a length-1 axis, so the result must differ.
    wrong = per_sample_gradient(
        layer, [x.movedim(1, 0)], torch.ones_like(x).movedim(1, 0), batch_first=True
    )
    assert not torch.allclose(wrong[layer.weight], expected["weight"])


def test_ft_compute_per_sample_gradient_covers_every_parameter():
    """All of layer.parameters() (as Opacus 1.6); the hooks' path skips frozen ones."""
    torch.manual_seed(5)
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    x, r = torch.randn(4, 3), torch.randn(4, 2)
    out = ft_compute_per_sample_gradient(layer, [x], r)
    assert set(out) == {layer.weight, layer.bias}
    torch.testing.assert_close(out[layer.weight], torch.einsum("bo,bi->boi", r, x))
    torch.testing.assert_close(out[layer.bias], r)
    assert set(per_sample_gradient(layer, [x], r, batch_first=True)) == {layer.weight}


def test_prepare_layer_sets_ft_compute_sample_grad():
    torch.manual_seed(6)
    layer = nn.Linear(3, 2)
    assert prepare_layer(layer) is None
    fn = layer.ft_compute_sample_grad
    x, r = torch.randn(5, 3), torch.randn(5, 2)
    expected = brute_force_grad_samples(layer, x, loss_fn=lambda o, t: (o * t).sum(), targets=r)
    weight, bias = fn([p.detach() for p in layer.parameters()], x, r)
    assert_grad_samples_close({"weight": weight, "bias": bias}, expected)
    with pytest.raises(ValueError, match="expected 2"):
        fn([layer.weight.detach()], x, r)


def test_prepare_layer_time_major_uses_dim_1():
    class TimeCumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x.cumsum(dim=0) * self.weight

    torch.manual_seed(7)
    layer = TimeCumsum()
    x = torch.randn(5, 4, 3)  # (T, B, F)
    expected = brute_force_grad_samples(layer, x, batch_dim=1)
    prepare_layer(layer, batch_first=False)
    (weight,) = layer.ft_compute_sample_grad(
        [layer.weight.detach()], x.movedim(1, 0), torch.ones(4, 5, 3)
    )
    torch.testing.assert_close(weight, expected["weight"])


def test_prepare_layer_refuses_buffers_and_embedding_bag():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))
            self.inner = nn.Module()
            self.inner.register_buffer("scale", torch.ones(3))

        def forward(self, x):
            return x * self.w * self.inner.scale

    with pytest.raises(NotImplementedError, match="buffers.*inner.scale"):
        prepare_layer(Scaled())
    with pytest.raises(NotImplementedError, match="EmbeddingBag"):
        prepare_layer(nn.EmbeddingBag(4, 2), batch_first=True)
    layer = nn.EmbeddingBag(4, 2)
    assert not hasattr(layer, "ft_compute_sample_grad")


def test_activations_are_cast_to_the_backprops_dtype():
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 3)  # float32 input, float64 layer and backprops
    r = torch.randn(4, 2, dtype=torch.float64)
    out = ft_compute_per_sample_gradient(layer, [x], r)
    assert out[layer.weight].dtype == torch.float64
    torch.testing.assert_close(out[layer.weight], torch.einsum("bo,bi->boi", r, x.double()))


def test_make_functional():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    fmodel, params = make_functional(model)
    x = torch.randn(5, 3)
    torch.testing.assert_close(fmodel(params, x), model(x))
    doubled = tuple(2 * p for p in params)
    assert not torch.allclose(fmodel(doubled, x), model(x))
    _, detached = make_functional(model, disable_autograd_tracking=True)
    assert not any(p.requires_grad for p in detached)


def test_functorch_mode_equals_hooks_mode():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.Linear(2 * 3 * 3, 2)
    )
    x = torch.randn(4, 1, 5, 5)
    expected = brute_force_grad_samples(model, x)
    hooks = GradSampleModule(model, loss_reduction="sum")
    hooks(x).sum().backward()
    via_hooks = {n: g.clone() for n, g in grad_samples_of(hooks).items()}
    model = hooks.to_standard_module()
    ft = wrap_model(model, grad_sample_mode="functorch", loss_reduction="sum")
    assert ft.force_functorch
    ft(x).sum().backward()
    assert_grad_samples_close(grad_samples_of(ft), expected)
    assert_grad_samples_close(via_hooks, expected)


def test_module_with_own_parameter_and_hooked_child():
    """A non-leaf trainable module without a sampler is handled whole by functorch (its child's
    parameters included; the child gets no hooks of its own)."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Parameter(torch.randn(3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) * torch.sigmoid(self.gate)

    torch.manual_seed(4)
    model = nn.Sequential(Gated(), nn.Tanh(), nn.Linear(3, 1))
    x = torch.randn(5, 3)
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction="sum")
    assert list(gsm.iterate_submodules(model)) == [model[0], model[2]]
    assert hasattr(model[0], "ft_compute_sample_grad")
    assert not hasattr(model[0].fc, "ft_compute_sample_grad")
    gsm(x).sum().backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)

"""The hooks' bookkeeping contract (Opacus 1.6): per-pass chunks, hook handles and attributes,
the eagerly prepared ``torch.func`` fallback, BatchNorm in eval mode, EmbeddingBag bags."""

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample import (
    GradSampleHooks,
    GradSampleHooksFastGradientClipping,
    GradSampleModule,
    registry,
    wrap_model,
)
from opacus.grad_sample.functorch import per_sample_gradient
from opacus.grad_sample.grad_sample_module import GRAD_SAMPLE_NORMS_ATTR
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples, grad_samples_of

MODES = ["hooks", "functorch"]


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _wrap(model, mode, **kwargs):
    return wrap_model(model, grad_sample_mode=mode, **kwargs)


# --------------------------------------------------------------- per-pass chunks (cluster 11)
@pytest.mark.parametrize("mode", MODES)
def test_eight_passes_give_eight_chunks_whose_mean_is_the_full_gradient(mode):
    torch.manual_seed(0)
    model = _mlp()
    data = torch.randn(128, 5)
    target = torch.randn(128, 3)

    def loss_fn(out, t):
        return ((out - t) ** 2).sum(dim=1).mean()

    full = torch.autograd.grad(loss_fn(model(data), target), list(model.parameters()))
    batches = [(data[i : i + 16], target[i : i + 16]) for i in range(0, 128, 16)]
    expected = [brute_force_grad_samples(model, x, loss_fn=loss_fn, targets=t) for x, t in batches]
    gsm = _wrap(model, mode, loss_reduction="mean")
    for x, t in batches:
        loss_fn(gsm(x), t).backward()
    chunks = grad_samples_of(gsm)
    for name, chunk in chunks.items():
        assert isinstance(chunk, list) and len(chunk) == 8
        assert all(c.shape[0] == 16 for c in chunk)
    for k in range(8):
        assert_grad_samples_close({n: c[k] for n, c in chunks.items()}, expected[k])
    for (name, _), g in zip(model.named_parameters(), full):
        torch.testing.assert_close(torch.cat(chunks[name]).mean(dim=0), g, atol=1e-6, rtol=1e-5)


def test_frozen_parameters_never_get_grad_sample():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    gsm = GradSampleModule(model, loss_reduction="sum")
    for _ in range(2):
        gsm(torch.randn(3, 5)).sum().backward()
    gsm.zero_grad()
    assert not hasattr(model[0].weight, "grad_sample")
    assert not hasattr(model[0].weight, "_forward_counter")
    assert model[0].bias.grad_sample is None


def test_make_private_style_forbidden_accumulation_raises_inside_backward():
    model = _mlp()
    hooks = GradSampleHooks(model, loss_reduction="sum")
    hooks.forbid_grad_accumulation()
    model(torch.randn(4, 5)).sum().backward()
    first = {n: p.grad_sample for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError, match="(?s)Poisson sampling is incompatible.*BatchMemoryManager"
    ):
        model(torch.randn(2, 5)).sum().backward()
    assert all(p.grad_sample is first[n] for n, p in model.named_parameters())


def test_book_kept_norms_describe_the_tensor_and_vanish_with_chunks():
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm(torch.randn(5, 4)).pow(2).sum().backward()
    for p in model.parameters():
        _, _, norms, _ = getattr(p, GRAD_SAMPLE_NORMS_ATTR)
        torch.testing.assert_close(norms, p.grad_sample.flatten(1).norm(dim=1))
    gsm(torch.randn(2, 4)).pow(2).sum().backward()
    assert all(isinstance(p.grad_sample, list) for p in model.parameters())
    assert not any(hasattr(p, GRAD_SAMPLE_NORMS_ATTR) for p in model.parameters())
    gsm.zero_grad()
    gsm(torch.randn(2, 4)).pow(2).sum().backward()
    assert all(hasattr(p, GRAD_SAMPLE_NORMS_ATTR) for p in model.parameters())


# ----------------------------------------------------------- hook bookkeeping (cluster 13)
def _hooked_count(hooks):
    return len(list(hooks.iterate_submodules(hooks._module)))


@pytest.mark.parametrize("cls", [GradSampleHooks, GradSampleHooksFastGradientClipping])
def test_hooks_creation(cls):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.LayerNorm(2))
    model[3].weight.requires_grad_(False)
    hooks = cls(model)
    assert hooks._module is model and hooks.hooks_enabled
    assert model.autograd_grad_sample_hooks is hooks.autograd_grad_sample_hooks
    assert _hooked_count(hooks) == 3
    assert len(model.autograd_grad_sample_hooks) == 2 * 3
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad_sample is None and p._forward_counter == 0
        else:
            assert not hasattr(p, "grad_sample") and not hasattr(p, "_forward_counter")
    hooks.disable_hooks()
    assert not hooks.hooks_enabled
    hooks.enable_hooks()
    assert hooks.hooks_enabled
    hooks.cleanup()


def test_wrapping_the_same_model_twice_is_refused_at_wrap_time():
    model = _mlp()
    gsm = GradSampleModule(model)
    with pytest.raises(ValueError, match="(?s)GradSampleModule.*already.*wrapped twice"):
        GradSampleModule(model)
    with pytest.raises(ValueError, match="already"):
        GradSampleHooks(model)
    with pytest.raises(ValueError, match="already"):
        GradSampleModule(gsm)
    # The first wrapper is untouched and still works.
    gsm(torch.randn(3, 5)).sum().backward()
    assert all(p.grad_sample.shape[0] == 3 for p in model.parameters())
    gsm.to_standard_module()
    GradSampleModule(model)


def test_forward_counter_counts_pending_calls():
    model = _mlp()
    gsm = GradSampleModule(model, loss_reduction="sum")
    y1, y2 = gsm(torch.randn(3, 5)), gsm(torch.randn(3, 5))
    assert all(p._forward_counter == 2 for p in model.parameters())
    (y1.sum() + y2.sum()).backward()
    assert all(p._forward_counter == 0 for p in model.parameters())
    gsm(torch.randn(3, 5))  # never backpropagated: dropped at the next forward
    gsm(torch.randn(3, 5)).sum().backward()
    assert all(p._forward_counter == 0 for p in model.parameters())


def test_remove_hooks_and_cleanup_delete_every_attribute():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(5))

        def forward(self, x):
            return x * self.g

    model = nn.Sequential(Gate(), nn.Linear(5, 2))
    gsm = GradSampleModule(model)
    assert hasattr(model[0], "ft_compute_sample_grad")
    gsm(torch.randn(3, 5)).sum().backward()
    gsm.remove_hooks()
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert "autograd_grad_sample_hooks" not in vars(gsm)
    assert not hasattr(model[0], "ft_compute_sample_grad")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad_sample is not None for p in model.parameters())
    gsm.cleanup()  # hooks already gone: still cleans the parameters
    for p in model.parameters():
        for attr in ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample"):
            assert not hasattr(p, attr)


def test_cleanup_logs_a_failing_remove_hooks_and_continues(caplog, monkeypatch):
    model = _mlp()
    hooks = GradSampleHooks(model)
    model(torch.randn(2, 5)).sum().backward()

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(hooks, "remove_hooks", broken)
    with caplog.at_level(logging.WARNING):
        hooks._close()
    assert any("boom" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


# ------------------------------------------------- torch.func prepared eagerly (cluster 12)
class CustomLinear(nn.Module):
    """The root calls F.linear on its own parameters."""

    def __init__(self, d_in=4, d_out=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class PrivateNames(nn.Module):
    """Parameters named ``_weight``/``_bias``."""

    def __init__(self):
        super().__init__()
        self._weight = nn.Parameter(torch.randn(3, 4))
        self._bias = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x @ self._weight.t() + self._bias


class MatMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return torch.matmul(x, self.w)


class ExtraParameter(nn.Module):
    """An extra parameter next to an nn.Linear child: the root is handled whole."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.fc(x) * self.scale


FUNCTORCH_MODELS = [CustomLinear, PrivateNames, MatMul, ExtraParameter]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("model_cls", FUNCTORCH_MODELS)
def test_standard_module_validation(model_cls, reduction, mode):
    torch.manual_seed(2)
    model = model_cls()
    x = torch.randn(6, 4)
    expected = brute_force_grad_samples(model, x)
    gsm = _wrap(model, mode, loss_reduction=reduction)
    assert hasattr(gsm._module, "ft_compute_sample_grad")
    assert [m for m in model.modules() if hasattr(m, "ft_compute_sample_grad")] == [model]
    out = gsm(x)
    (out.sum() / 6 if reduction == "mean" else out.sum()).backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)
    gsm.remove_hooks()
    assert not hasattr(model, "ft_compute_sample_grad")


@pytest.mark.parametrize("model_cls", FUNCTORCH_MODELS)
def test_a_registered_sampler_replaces_functorch(model_cls, monkeypatch):
    torch.manual_seed(3)
    model = model_cls()
    x = torch.randn(5, 4)
    expected = brute_force_grad_samples(model, x)
    calls = []

    def sampler(layer, activations, backprops):
        calls.append(layer)
        return per_sample_gradient(layer, activations, backprops, batch_first=True)

    monkeypatch.setitem(registry.GRAD_SAMPLERS, model_cls, sampler)
    gsm = GradSampleModule(model, loss_reduction="sum")
    assert not hasattr(model, "ft_compute_sample_grad")
    gsm(x).sum().backward()
    assert calls == [model]
    assert_grad_samples_close(grad_samples_of(gsm), expected)


def test_force_functorch_prepares_every_hooked_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    gsm = GradSampleModule(model, force_functorch=True)
    assert hasattr(model[0], "ft_compute_sample_grad") and hasattr(
        model[2], "ft_compute_sample_grad"
    )
    assert not hasattr(model, "ft_compute_sample_grad")
    gsm.cleanup()
    assert not any(hasattr(m, "ft_compute_sample_grad") for m in model.modules())
    GradSampleModule(model)
    assert not any(hasattr(m, "ft_compute_sample_grad") for m in model.modules())


# -------------------------------------------------------------- BatchNorm (cluster 17 note)
def _bn_model():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)
    )
    with torch.no_grad():  # statistics from a public warm-up, not the unit ones
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_norm_in_eval_mode_is_allowed_and_exact(reduction, mode):
    torch.manual_seed(4)
    model = _bn_model()
    model[1].eval()
    x = torch.randn(5, 2, 4, 4)
    expected = brute_force_grad_samples(model, x)
    running = model[1].running_mean.clone()
    gsm = _wrap(model, mode, loss_reduction=reduction)
    out = gsm(x)
    (out.sum() / 5 if reduction == "mean" else out.sum()).backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)
    assert torch.equal(model[1].running_mean, running)  # no statistics of the private batch


def test_batch_norm_in_training_mode_is_refused_at_wrap_and_at_forward():
    with pytest.raises(NotImplementedError, match="BatchNorm2d.*training mode"):
        GradSampleModule(_bn_model())
    frozen = _bn_model()
    frozen[1].requires_grad_(False)
    with pytest.raises(NotImplementedError, match="training mode"):
        GradSampleModule(frozen)  # frozen, but still normalising with batch statistics
    model = _bn_model()
    model.eval()
    gsm = GradSampleModule(model)
    gsm.train()  # the usual call before a training loop: BatchNorm back in training mode
    running = model[1].running_mean.clone()
    with pytest.raises(RuntimeError, match=r"(?s)'1' \(BatchNorm2d\).*\.eval\(\)"):
        gsm(torch.randn(3, 2, 4, 4))
    assert torch.equal(model[1].running_mean, running)  # refused before the layer ran
    with torch.no_grad():
        gsm(torch.randn(3, 2, 4, 4))  # not a training forward
    model[1].eval()
    gsm(torch.randn(3, 2, 4, 4)).sum().backward()
    assert model[1].weight.grad_sample.shape == (3, 3)


def test_batch_norm_without_running_statistics_is_refused_even_in_eval():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    model.eval()
    with pytest.raises(NotImplementedError, match="BatchNorm1d"):
        GradSampleModule(model)


# ------------------------------------------------------- EmbeddingBag bags (cluster 19)
def _bag_oracle(bag, index, offsets, reduction, r):
    """Per-bag brute force: bag i alone through the layer, its own loss <out_i, r_i>."""
    bounds = offsets.tolist() + [index.shape[0]]
    rows = []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        out = bag(index[start:end], torch.tensor([0]))
        rows.append(torch.autograd.grad((out[0] * r[i]).sum(), bag.weight)[0])
    return torch.stack(rows)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 4), min_size=1, max_size=5),
    vocab=st.integers(1, 5),
    mode=st.sampled_from(["sum", "mean"]),
    reduction=st.sampled_from(["sum", "mean"]),
    data=st.data(),
)
def test_embedding_bag_offsets_one_row_per_bag(sizes, vocab, mode, reduction, data):
    """A small vocabulary repeats indices within a bag; empty bags included."""
    torch.manual_seed(5)
    bag = nn.EmbeddingBag(vocab, 3, mode=mode).double()
    index = torch.tensor(
        data.draw(st.lists(st.integers(0, vocab - 1), min_size=sum(sizes), max_size=sum(sizes))),
        dtype=torch.long,
    )
    offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
    r = torch.randn(len(sizes), 3, dtype=torch.float64)
    expected = _bag_oracle(bag, index, offsets, reduction, r)
    gsm = GradSampleModule(bag, loss_reduction=reduction)
    loss = (gsm(index, offsets) * r).sum()
    (loss / len(sizes) if reduction == "mean" else loss).backward()
    assert bag.weight.grad_sample.shape == (len(sizes), vocab, 3)
    torch.testing.assert_close(bag.weight.grad_sample, expected, atol=1e-12, rtol=1e-10)


def test_embedding_bag_in_a_model_and_include_last_offset():
    torch.manual_seed(6)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(7, 4, mode="mean", include_last_offset=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, index, offsets):
            return self.fc(self.bag(index, offsets))

    model = Model()
    index = torch.tensor([1, 1, 3, 6, 0, 2])
    offsets = torch.tensor([0, 3, 4, 6])  # three bags
    gsm = GradSampleModule(model, loss_reduction="mean")
    (gsm(index, offsets).sum() / 3).backward()
    grads = grad_samples_of(gsm)
    assert grads["bag.weight"].shape == (3, 7, 4) and grads["fc.weight"].shape == (3, 2, 4)
    for i, (start, end) in enumerate([(0, 3), (3, 4), (4, 6)]):
        model.zero_grad()
        model(index[start:end], torch.tensor([0, end - start])).sum().backward()
        torch.testing.assert_close(grads["bag.weight"][i], model.bag.weight.grad)
        torch.testing.assert_close(grads["fc.weight"][i], model.fc.weight.grad)


def test_embedding_bag_errors_are_clear():
    with pytest.raises(NotImplementedError, match="mode='max'"):
        GradSampleModule(nn.EmbeddingBag(4, 2, mode="max"))
    # Keyword offsets reach the grad sampler (they used to be refused here; keyword
    # per_sample_weights were silently dropped): one per-sample gradient per bag.
    bag = nn.EmbeddingBag(4, 2)
    gsm = GradSampleModule(bag)
    gsm(torch.tensor([0, 1, 2]), offsets=torch.tensor([0, 1])).sum().backward()
    assert bag.weight.grad_sample.shape == (2, 4, 2)


def test_parameter_aliases_of_children_do_not_make_a_functorch_module():
    """A container registering its child's parameter under another name (as DP RNNs expose
    torch's names) is looked through: the child's hook covers the parameter."""
    from opacus.layers import DPLSTM

    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.register_parameter("alias", self.fc.weight)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(7)
    model = Alias()
    x = torch.randn(5, 4)
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction="sum")
    assert list(gsm.iterate_submodules(model)) == [model.fc]
    assert not hasattr(model, "ft_compute_sample_grad")
    gsm(x).sum().backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)

    lstm = DPLSTM(3, 4)
    lstm.register_parameter("alias_ih_l0", lstm.l0.ih.weight)
    hooks = GradSampleHooks(lstm)
    assert all(type(m).__name__ == "RNNLinear" for m in hooks.iterate_submodules(lstm))

"""GradSampleModule (hooks mode) against the brute-force per-sample oracle."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module import (
    create_or_accumulate_grad_sample,
    promote_current_grad_sample,
)
from opacus.utils.module_utils import are_state_dict_equal
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples, grad_samples_of


def _mlp(d_in=5, d_hidden=7, d_out=3):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


class TimeCumsum(nn.Module):
    """A layer that mixes time steps (dim 0 in the (T, B, F) layout): layout-sensitive."""

    def __init__(self, features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return x.cumsum(dim=0) * self.weight


def _cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, kernel_size=3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )


def _batched_loss(output, reduction, batch_size):
    return output.sum() / batch_size if reduction == "mean" else output.sum()


def _run(gsm, x, reduction, batch_dim=0):
    out = gsm(x)
    _batched_loss(out, reduction, x.shape[batch_dim]).backward()
    return grad_samples_of(gsm)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("force_functorch", [False, True])
def test_mlp_matches_brute_force(reduction, force_functorch):
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(6, 5)
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction=reduction, force_functorch=force_functorch)
    assert_grad_samples_close(_run(gsm, x, reduction), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cnn_matches_brute_force(reduction):
    torch.manual_seed(1)
    model = _cnn()
    x = torch.randn(4, 2, 5, 5)
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction=reduction)
    assert_grad_samples_close(_run(gsm, x, reduction), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("force_functorch", [False, True])
def test_time_major_layout(reduction, force_functorch):
    """Layers see (T, B, F); per-sample gradients are taken over dim 1."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), TimeCumsum(6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(3, 5, 4)  # T=3, B=5
    expected = brute_force_grad_samples(model, x, batch_dim=1)
    gsm = GradSampleModule(
        model, batch_first=False, loss_reduction=reduction, force_functorch=force_functorch
    )
    assert_grad_samples_close(_run(gsm, x, reduction, batch_dim=1), expected)


def test_time_major_layout_wrong_flag_is_caught_by_oracle():
    """The oracle distinguishes the layouts: batch_first=True on (T, B, F) data differs."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), TimeCumsum(6))
    x = torch.randn(3, 5, 4)
    expected = brute_force_grad_samples(model, x, batch_dim=1)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    # The batch-mixing probe sees TimeCumsum mix along the dim the wrong flag calls the batch.
    with pytest.raises(RuntimeError, match=r"'1' \(TimeCumsum\).*fix the wrapper's batch_first"):
        gsm(x)
    gsm.zero_grad()
    gsm.check_batch_mixing = False
    actual = _run(gsm, x, "sum")
    assert actual["0.weight"].shape != expected["0.weight"].shape


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sequence_batch_first(reduction):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    x = torch.randint(0, 11, (5, 7))
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction=reduction)
    assert_grad_samples_close(_run(gsm, x, reduction), expected)


def test_unregistered_trainable_layers_use_functorch():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.ConvTranspose2d(2, 3, kernel_size=2), nn.PReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
    )
    x = torch.randn(4, 2, 3, 3)
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction="sum")
    assert_grad_samples_close(_run(gsm, x, "sum"), expected)


def test_repeated_calls_are_summed():
    """A layer used twice in one forward: its per-sample gradient is the sum over both uses."""
    torch.manual_seed(5)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.fc(torch.tanh(self.fc(x))))

    model = Twice()
    x = torch.randn(6, 4)
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction="mean")
    assert_grad_samples_close(_run(gsm, x, "mean"), expected)


def test_tied_weights_are_summed():
    torch.manual_seed(6)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4)
            self.head = nn.Linear(4, 9, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x)))

    model = Tied()
    x = torch.randint(0, 9, (5, 3))
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction="sum")
    out = gsm(x)
    out.sum().backward()
    torch.testing.assert_close(gsm._module.emb.weight.grad_sample, expected["emb.weight"])


def test_frozen_parameters_get_no_grad_sample():
    torch.manual_seed(7)
    model = _mlp()
    model[0].weight.requires_grad_(False)
    x = torch.randn(4, 5)
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction="sum")
    assert_grad_samples_close(_run(gsm, x, "sum"), expected)
    assert getattr(model[0].weight, "grad_sample", None) is None


def test_two_backward_passes_give_two_chunks():
    """Per-sample gradients are kept per pass: rows of two batches are never added together."""
    torch.manual_seed(8)
    model = _mlp()
    x1, x2 = torch.randn(4, 5), torch.randn(4, 5)
    e1 = brute_force_grad_samples(model, x1)
    e2 = brute_force_grad_samples(model, x2, loss_fn=lambda o: (o**2).sum())
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm(x1).sum().backward()
    assert all(torch.is_tensor(g) for g in grad_samples_of(gsm).values())
    (gsm(x2) ** 2).sum().backward()
    chunks = grad_samples_of(gsm)
    assert all(isinstance(g, list) and len(g) == 2 for g in chunks.values())
    assert_grad_samples_close({n: g[0] for n, g in chunks.items()}, e1)
    assert_grad_samples_close({n: g[1] for n, g in chunks.items()}, e2)


def test_passes_of_different_batch_sizes_are_kept_apart():
    torch.manual_seed(11)
    model = _mlp()
    x1, x2, x3 = torch.randn(4, 5), torch.randn(3, 5), torch.randn(1, 5)
    expected = [brute_force_grad_samples(model, x) for x in (x1, x2, x3)]
    gsm = GradSampleModule(model, loss_reduction="sum")
    for x in (x1, x2, x3):
        gsm(x).sum().backward()
    chunks = grad_samples_of(gsm)
    for i, e in enumerate(expected):
        assert_grad_samples_close({n: g[i] for n, g in chunks.items()}, e)


def test_forbidden_accumulation_raises_and_zero_grad_resets():
    model = _mlp()
    x = torch.randn(4, 5)
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.forbid_grad_accumulation()
    gsm(x).sum().backward()
    with pytest.raises(ValueError, match="Poisson sampling is incompatible with gradient accum"):
        gsm(x).sum().backward()
    # The refused pass left the first one untouched.
    assert_grad_samples_close(grad_samples_of(gsm), expected)
    gsm.zero_grad()
    assert all(p.grad_sample is None for p in model.parameters())
    gsm(x).sum().backward()  # fine after zero_grad
    assert_grad_samples_close(grad_samples_of(gsm), expected)
    gsm.allow_grad_accumulation()
    gsm(x).sum().backward()
    chunks = grad_samples_of(gsm)
    assert all(len(g) == 2 for g in chunks.values())
    assert_grad_samples_close({n: g[1] for n, g in chunks.items()}, expected)


def test_zero_grad_set_to_none_and_helpers():
    model = _mlp()
    gsm = GradSampleModule(model)
    gsm(torch.randn(3, 5)).sum().backward()
    gsm.zero_grad(set_to_none=True)
    assert all(p.grad is None and p.grad_sample is None for p in model.parameters())
    gsm(torch.randn(3, 5)).sum().backward()
    gsm.del_grad_sample()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_zero_size_batch():
    model = _mlp()
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm(torch.randn(0, 5)).sum().backward()
    for _, p in model.named_parameters():
        assert p.grad_sample.shape == (0, *p.shape)


def test_disable_hooks_skips_per_sample_gradients():
    model = _mlp()
    gsm = GradSampleModule(model)
    gsm.disable_hooks()
    gsm(torch.randn(3, 5)).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert all(p.grad is not None for p in model.parameters())
    gsm.enable_hooks()
    gsm(torch.randn(3, 5)).sum().backward()
    assert all(p.grad_sample.shape[0] == 3 for p in model.parameters())


def test_eval_mode_and_no_grad_capture_nothing():
    model = _mlp()
    gsm = GradSampleModule(model)
    with torch.no_grad():
        gsm(torch.randn(3, 5))
    gsm.eval()
    gsm(torch.randn(3, 5))
    assert gsm._capture.counts() == {}


def _no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks and not m._backward_pre_hooks
        assert getattr(m, "_is_full_backward_hook", None) is None


def test_remove_hooks_leaves_the_model_untouched():
    torch.manual_seed(9)
    model = _mlp()
    reference = copy.deepcopy(model)
    gsm = GradSampleModule(model)
    gsm(torch.randn(3, 5)).sum().backward()
    model.zero_grad(set_to_none=True)
    plain = gsm.to_standard_module()
    assert plain is model
    _no_hooks(model)
    assert are_state_dict_equal(model.state_dict(), reference.state_dict())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert set(vars(model)) == set(vars(reference))
    for m, r in zip(model.modules(), reference.modules()):
        assert set(vars(m)) == set(vars(r))
    # The unwrapped model trains as a plain one.
    model(torch.randn(3, 5)).sum().backward()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_remove_hooks_then_add_hooks_again():
    model = _mlp()
    gsm = GradSampleModule(model)
    with pytest.raises(ValueError, match="already attached"):
        gsm.add_hooks()
    gsm.remove_hooks()
    _no_hooks(model)
    gsm(torch.randn(3, 5)).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    x = torch.randn(3, 5)
    expected = brute_force_grad_samples(model, x)
    gsm.add_hooks(loss_reduction="sum")
    gsm(x).sum().backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)


def test_batch_norm_is_rejected_with_path_and_fix():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4)))
    with pytest.raises(NotImplementedError) as info:
        GradSampleModule(model)
    message = str(info.value)
    assert "'1.0'" in message and "BatchNorm1d" in message and "training mode" in message
    assert "GroupNorm" in message and "ModuleValidator.fix" in message
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_trainable_module_with_buffers_is_rejected():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))
            self.register_buffer("scale", torch.ones(3))

        def forward(self, x):
            return x * self.w * self.scale

    model = nn.Sequential(nn.Linear(3, 3), Scaled())
    with pytest.raises(NotImplementedError, match="'1' .*buffers"):
        GradSampleModule(model)
    with pytest.warns(UserWarning, match="buffers"):
        gsm = GradSampleModule(model, strict=False)
    gsm(torch.randn(2, 3)).sum().backward()
    assert model[0].weight.grad_sample.shape == (2, 3, 3)
    assert getattr(model[1].w, "grad_sample", None) is None


def test_layer_with_another_batch_size_is_named():
    class Merge(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x):  # x: (B, T, F); fc2 sees the batch merged with time
            return self.fc2(self.fc1(x).reshape(-1, 4))

    gsm = GradSampleModule(Merge())
    with pytest.raises(ValueError) as info:
        gsm(torch.randn(3, 5, 4))
    message = str(info.value)
    assert "'fc2'" in message and "15" in message and "'fc1'" in message and "3" in message


def test_create_or_accumulate_with_shorter_calls():
    p = nn.Parameter(torch.zeros(2))
    create_or_accumulate_grad_sample(param=p, grad_sample=torch.ones(2, 2), max_batch_len=4)
    create_or_accumulate_grad_sample(param=p, grad_sample=torch.ones(4, 2), max_batch_len=4)
    create_or_accumulate_grad_sample(param=p, grad_sample=torch.ones(1, 2), max_batch_len=4)
    expected = torch.tensor([[3.0, 3.0], [2.0, 2.0], [1.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(p._current_grad_sample, expected)
    promote_current_grad_sample(p)
    assert not hasattr(p, "_current_grad_sample")
    torch.testing.assert_close(p.grad_sample, expected)
    # A later pass is a chunk of its own (a list), never added row by row.
    create_or_accumulate_grad_sample(param=p, grad_sample=torch.ones(3, 2), max_batch_len=3)
    promote_current_grad_sample(p)
    assert isinstance(p.grad_sample, list) and len(p.grad_sample) == 2
    torch.testing.assert_close(p.grad_sample[0], expected)
    torch.testing.assert_close(p.grad_sample[1], torch.ones(3, 2))
    create_or_accumulate_grad_sample(param=p, grad_sample=torch.ones(1, 2), max_batch_len=1)
    promote_current_grad_sample(p)
    assert [tuple(g.shape) for g in p.grad_sample] == [(4, 2), (3, 2), (1, 2)]
    with pytest.raises(ValueError, match="max_batch_len"):
        create_or_accumulate_grad_sample(param=p, grad_sample=torch.ones(5, 2), max_batch_len=4)


def test_shorter_later_calls_end_to_end():
    """A layer re-applied to a prefix of the batch (as packed sequences do): rows line up."""
    torch.manual_seed(10)
    fc = nn.Linear(3, 3)
    ref = copy.deepcopy(fc)
    gsm = GradSampleModule(fc, loss_reduction="sum")
    x = torch.randn(4, 3)
    y = gsm(x)
    z = gsm(y[:2])
    (y.sum() + z.sum()).backward()
    # Sample i's loss: sum(fc(x_i)) + [i < 2] * sum(fc(fc(x_i))).
    for i in range(4):
        xi = x[i : i + 1]
        loss = ref(xi).sum() + (ref(ref(xi)).sum() if i < 2 else 0)
        gw, gb = torch.autograd.grad(loss, [ref.weight, ref.bias])
        torch.testing.assert_close(fc.weight.grad_sample[i], gw)
        torch.testing.assert_close(fc.bias.grad_sample[i], gb)


def test_attribute_fallthrough_and_state_dict():
    model = _mlp()
    model.note = "kept"
    gsm = GradSampleModule(model)
    assert gsm.note == "kept" and gsm._module is model
    assert list(gsm.state_dict()) == ["_module." + k for k in model.state_dict()]
    with pytest.raises(AttributeError):
        gsm.does_not_exist


def test_bad_loss_reduction():
    with pytest.raises(ValueError, match="loss_reduction"):
        GradSampleModule(_mlp(), loss_reduction="avg")


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 6),
    d_in=st.integers(1, 5),
    d_hidden=st.integers(1, 5),
    seq=st.integers(0, 3),
    reduction=st.sampled_from(["mean", "sum"]),
    batch_first=st.booleans(),
)
def test_hypothesis_shapes(batch, d_in, d_hidden, seq, reduction, batch_first):
    torch.manual_seed(batch * 31 + d_in)
    model = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ELU(), nn.Linear(d_hidden, 2))
    if seq == 0:
        batch_first = True
        x, batch_dim = torch.randn(batch, d_in), 0
    elif batch_first:
        x, batch_dim = torch.randn(batch, seq, d_in), 0
    else:
        x, batch_dim = torch.randn(seq, batch, d_in), 1
    expected = brute_force_grad_samples(model, x, batch_dim=batch_dim)
    gsm = GradSampleModule(model, batch_first=batch_first, loss_reduction=reduction)
    assert_grad_samples_close(_run(gsm, x, reduction, batch_dim), expected)

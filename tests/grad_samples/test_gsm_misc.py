"""Engine selection, hooks-only mode, no-op wrapper, class layout and DP-layer integration."""

import pytest
import torch
import torch.nn as nn

import opacus
from opacus.grad_sample import (
    AbstractGradSampleHooks,
    AbstractGradSampleModule,
    GradSampleHooks,
    GradSampleHooksFastGradientClipping,
    GradSampleHooksNoOp,
    GradSampleModule,
    GradSampleModuleExpandedWeights,
    GradSampleModuleFastGradientClipping,
    GradSampleModuleFastGradientClippingFSDP,
    GradSampleModuleNoOp,
    get_gsm_class,
    registry,
    wrap_model,
)
from opacus.grad_sample.utils import get_hooks_class
from opacus.layers import DPLSTM, DPMultiheadAttention
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples, grad_samples_of


def test_class_hierarchy_matches_the_interface():
    assert GradSampleModule.__bases__ == (GradSampleHooks, AbstractGradSampleModule)
    assert AbstractGradSampleModule.__bases__[:2] == (nn.Module, AbstractGradSampleHooks)
    assert issubclass(GradSampleHooksFastGradientClipping, GradSampleHooks)
    assert GradSampleModuleFastGradientClipping.__bases__ == (
        GradSampleHooksFastGradientClipping,
        AbstractGradSampleModule,
    )
    assert GradSampleModule.GRAD_SAMPLERS is registry.GRAD_SAMPLERS
    assert opacus.GradSampleModule is GradSampleModule


@pytest.mark.parametrize(
    "mode, cls",
    [
        ("hooks", GradSampleModule),
        ("functorch", GradSampleModule),
        ("ghost", GradSampleModuleFastGradientClipping),
        ("ghost_fsdp", GradSampleModuleFastGradientClippingFSDP),
        ("ew", GradSampleModuleExpandedWeights),
        ("no_op", GradSampleModuleNoOp),
    ],
)
def test_get_gsm_class_and_wrap_model(mode, cls):
    assert get_gsm_class(mode) is cls
    wrapped = wrap_model(nn.Linear(2, 2), grad_sample_mode=mode)
    assert type(wrapped) is cls
    assert getattr(wrapped, "force_functorch", False) == (mode == "functorch")


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'jax'.*hooks"):
        get_gsm_class("jax")
    with pytest.raises(ValueError, match="'ew'"):
        get_hooks_class("ew")


def test_hooks_only_mode_keeps_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    expected = brute_force_grad_samples(model, x)
    hooks = wrap_model(model, grad_sample_mode="hooks", wrap_model=False, loss_reduction="sum")
    assert type(hooks) is GradSampleHooks and not isinstance(hooks, nn.Module)
    model(x).sum().backward()
    assert_grad_samples_close(grad_samples_of(model), expected)
    hooks.cleanup()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not model[0]._forward_hooks and not model[0]._backward_hooks


def test_no_op_computes_nothing():
    model = nn.Linear(3, 2)
    noop = GradSampleModuleNoOp(model)
    noop(torch.randn(4, 3)).sum().backward()
    assert getattr(model.weight, "grad_sample", None) is None and model.weight.grad is not None
    assert isinstance(get_hooks_class("no_op")(model), GradSampleHooksNoOp)


def test_validate_and_is_supported():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.LSTM(2, 2))
    errors = GradSampleModule.validate(model, strict=False)
    assert len(errors) == 2 and all(isinstance(e, NotImplementedError) for e in errors)
    assert "DPLSTM" in str(errors[1])
    with pytest.raises(NotImplementedError):
        GradSampleModule.validate(model, strict=True)
    assert GradSampleModule.validate(nn.Sequential(nn.Linear(2, 2), nn.PReLU())) == []
    assert GradSampleModule.is_supported(nn.Linear(2, 2))
    assert not GradSampleModule.is_supported(nn.PReLU())
    assert GradSampleModule.is_supported(DPLSTM(2, 2))


def test_iterate_submodules_stops_at_registered_containers(monkeypatch):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

        def forward(self, x):
            return self.inner(x)

    def block_sampler(layer, activations, backprops):
        return {
            layer.inner.weight: torch.einsum("bo,bi->boi", backprops, activations[0]),
            layer.inner.bias: backprops,
        }

    monkeypatch.setitem(registry.GRAD_SAMPLERS, Block, block_sampler)
    torch.manual_seed(1)
    model = nn.Sequential(Block(), nn.Tanh(), nn.Linear(2, 1))
    x = torch.randn(4, 2)
    expected = brute_force_grad_samples(model, x)
    gsm = GradSampleModule(model, loss_reduction="sum")
    assert list(gsm.iterate_submodules(model)) == [model[0], model[2]]
    gsm(x).sum().backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)


@pytest.mark.parametrize("batch_first", [True, False])
def test_dp_lstm_per_sample_gradients(batch_first):
    """RNNLinear layers see (B, F) each step whatever batch_first says (_batch_dim_always_first)."""
    torch.manual_seed(2)
    model = DPLSTM(3, 4, batch_first=batch_first)
    x = torch.randn(5, 4, 3) if batch_first else torch.randn(4, 5, 3)
    batch_dim = 0 if batch_first else 1

    def loss(out):
        return out[0].sum()

    expected = brute_force_grad_samples(model, x, batch_dim=batch_dim, loss_fn=loss)
    gsm = GradSampleModule(model, batch_first=batch_first, loss_reduction="mean")
    (loss(gsm(x)) / 5).backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)


@pytest.mark.parametrize("batch_first", [True, False])
def test_dp_multihead_attention(batch_first):
    torch.manual_seed(3)
    model = DPMultiheadAttention(4, 2, batch_first=batch_first, add_bias_kv=True)
    q = torch.randn(3, 5, 4) if batch_first else torch.randn(5, 3, 4)
    batch_dim = 0 if batch_first else 1

    def loss(out):
        return out[0].sum()

    expected = brute_force_grad_samples(model, (q, q, q), batch_dim=batch_dim, loss_fn=loss)
    gsm = GradSampleModule(model, batch_first=batch_first, loss_reduction="sum")
    loss(gsm(q, q, q)).backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)


def test_sharded_parameters_are_refused():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs a fresh torch.distributed")
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = nn.Linear(3, 2)
        mesh = init_device_mesh("cpu", (1,))
        model.weight = nn.Parameter(distribute_tensor(model.weight.data, mesh, [Replicate()]))
        with pytest.raises(NotImplementedError, match="weight are DTensor"):
            GradSampleModuleFastGradientClippingFSDP(model)
        with pytest.raises(NotImplementedError, match="DTensor"):
            wrap_model(model, grad_sample_mode="ghost_tp")
        # leave together: gloo can abort a rank whose peer tears down first
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ghost", [False, True])
def test_dp_lstm_packed_sequences(ghost):
    """Later time steps see fewer samples (max_batch_len padding); rows follow the input order."""
    from torch.nn.utils.rnn import pack_sequence

    torch.manual_seed(4)
    model = DPLSTM(3, 4, batch_first=True)
    seqs = [torch.randn(length, 3) for length in (2, 5, 3, 4)]
    expected = {n: [] for n, _ in model.named_parameters()}
    for s in seqs:  # one sequence at a time: the per-sample oracle for packed input
        out, _ = model(pack_sequence([s]))
        grads = torch.autograd.grad(out.data.sum(), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            expected[n].append(g)
    expected = {n: torch.stack(g) for n, g in expected.items()}
    cls = GradSampleModuleFastGradientClipping if ghost else GradSampleModule
    gsm = cls(model, batch_first=True, loss_reduction="sum")
    out, _ = gsm(pack_sequence(seqs, enforce_sorted=False))
    out.data.sum().backward()
    if ghost:
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).norm(dim=0)
        torch.testing.assert_close(gsm.get_norm_sample(), norms, rtol=1e-4, atol=1e-5)
    else:
        assert_grad_samples_close(grad_samples_of(gsm), expected)

"""Book-keeping that keeps materialised per-sample gradients (``registry.KEEPS_GRADS_ATTR``):
the norms, the kept gradients and the clipped sums formed from them, against the brute-force
per-sample oracle; the cost rule; whole models (GPT-2, tied and untied) with every layer kept."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from opacus.grad_sample import linear as linear_mod
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
    tensor_hooks_run_on_captured_gradients,
)
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.grad_sample.linear import (
    _keeping_grad_is_cheaper,
    compute_linear_norm_sample,
    linear_norms_keeping_grads,
)
from opacus.grad_sample.registry import KEEPS_GRADS_ATTR, NORM_SAMPLERS, weighted_sums
from opacus.utils.fast_gradient_clipping_utils import double_backward
from tests.grad_samples.ghost_stubs import BoundOnly
from tests.grad_samples.tiny_lm import tiny_gpt2
from tests.oracle import brute_force_grad_samples


def _oracle(layer, x, r):
    """Per-sample grads ``{param: (B, *shape)}`` of loss_i = <layer(x_i), R_i>."""
    grads = brute_force_grad_samples(layer, x, loss_fn=lambda out, t: (out * t).sum(), targets=r)
    params = dict(layer.named_parameters())
    return {params[n]: g for n, g in grads.items()}


def _check_kept(layer, keeping, x, r, kept_expected=True):
    expected = _oracle(layer, x, r)
    norms, kept = keeping(layer, [x], r)
    assert set(norms) == set(expected)
    for p, g in expected.items():
        torch.testing.assert_close(norms[p], g.flatten(1).norm(dim=1), atol=1e-10, rtol=1e-9)
    if not kept_expected:
        assert kept is None
        return
    assert set(kept) == set(expected)
    w = torch.rand(x.shape[0], dtype=x.dtype)
    sums = weighted_sums(kept, w)
    for p, g in expected.items():
        torch.testing.assert_close(kept[p], g, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(sums[p], torch.einsum("b,b...->...", w, g))


def test_the_rule_at_the_lm_benchmark_shapes():
    """Sequence 128 and 512 (batch 8, GPT-2 width 256): keep every Conv1D and the 4096-way head;
    sequence 32: the Gram norms plus one product are cheaper; a wide layer whose gradient
    outgrows twice its activations and backprops is not kept."""
    for d_in, d_out in [(256, 768), (256, 256), (256, 1024), (1024, 256), (256, 4096)]:
        assert _keeping_grad_is_cheaper(128, d_in, d_out)
        assert _keeping_grad_is_cheaper(512, d_in, d_out)
        assert not _keeping_grad_is_cheaper(32, d_in, d_out)
    assert not _keeping_grad_is_cheaper(256, 1024, 4096)  # 4M > 2 * 256 * 5120: memory
    assert _keeping_grad_is_cheaper(1024, 1024, 4096)
    for seq, d_in, d_out in [(20, 2, 3), (7, 3, 1), (3, 5, 5)]:
        cheaper = d_in * d_out * 50 <= seq * seq * (d_in + d_out)
        fits = d_in * d_out <= 2 * seq * (d_in + d_out)
        assert _keeping_grad_is_cheaper(seq, d_in, d_out) == (cheaper and fits)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.integers(12, 20),
    d_in=st.integers(1, 3),
    d_out=st.integers(1, 3),
    bias=st.booleans(),
    frozen=st.sampled_from([None, "weight", "bias"]),
)
def test_linear_kept_grads_match_the_oracle(batch, seq, d_in, d_out, bias, frozen):
    assume(bias or frozen != "weight")  # something to train
    assert _keeping_grad_is_cheaper(seq, d_in, d_out)
    torch.manual_seed(seq)
    layer = nn.Linear(d_in, d_out, bias=bias).double()
    if frozen == "weight" or (frozen == "bias" and bias):
        getattr(layer, frozen).requires_grad_(False)
    x = torch.randn(batch, 2, seq // 2, d_in, dtype=torch.float64)  # two middle dims
    r = torch.randn(batch, 2, seq // 2, d_out, dtype=torch.float64)
    _check_kept(layer, linear_norms_keeping_grads, x, r)


def test_linear_keeps_nothing_where_the_ghost_norm_is_cheaper():
    torch.manual_seed(0)
    for shape_x, layer, dtype in [
        ((3, 4, 8), nn.Linear(8, 8), torch.float64),  # T = 4: the Gram norms
        ((3, 1, 8), nn.Linear(8, 2), torch.float64),  # T = 1: the norm product
        ((3, 30, 2), nn.Linear(2, 2), torch.bfloat16),  # half precision: never kept
    ]:
        layer = layer.to(dtype)
        x = torch.randn(*shape_x, dtype=dtype)
        r = torch.randn(*shape_x[:-1], layer.out_features, dtype=dtype)
        norms, kept = linear_norms_keeping_grads(layer, [x], r)
        assert kept is None
        want = compute_linear_norm_sample(layer, [x], r)
        assert set(norms) == set(want)
        for p in want:
            torch.testing.assert_close(norms[p], want[p])


def test_layer_norm_kept_grads_match_the_oracle():
    torch.manual_seed(0)
    layer = nn.LayerNorm(5).double()
    x, r = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    keeping = getattr(NORM_SAMPLERS[nn.LayerNorm], KEEPS_GRADS_ATTR)
    _check_kept(layer, keeping, x, r)
    _, kept = keeping(layer, [x], r)
    for p, g in compute_layer_norm_grad_sample(layer, [x], r).items():
        torch.testing.assert_close(kept[p], g)


def test_conv1d_and_rms_norm_kept_grads_match_the_oracle():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(3, 2).double()  # nf=3 outputs, nx=2 inputs: weight (2, 3)
    x, r = torch.randn(4, 16, 2, dtype=torch.float64), torch.randn(4, 16, 3, dtype=torch.float64)
    assert _keeping_grad_is_cheaper(16, 2, 3)
    _check_kept(conv, getattr(NORM_SAMPLERS[Conv1D], KEEPS_GRADS_ATTR), x, r)
    assert getattr(NORM_SAMPLERS[Conv1D], KEEPS_GRADS_ATTR)(conv, [x], r)[1][conv.weight].shape == (
        4,
        2,
        3,
    )
    rms = LlamaRMSNorm(6).double()
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    _check_kept(rms, getattr(NORM_SAMPLERS[LlamaRMSNorm], KEEPS_GRADS_ATTR), x, r)


def test_tied_cross_term_from_the_kept_head_gradient():
    pytest.importorskip("transformers")
    from opacus.grad_sample.transformers_layers import tied_embedding_linear_cross_term

    torch.manual_seed(0)
    for padding_idx in (None, 2):
        emb = nn.Embedding(7, 4, padding_idx=padding_idx).double()
        head = nn.Linear(4, 7, bias=False).double()
        ids = torch.randint(0, 7, (3, 5))
        ids[0, 0] = 2
        b_emb = torch.randn(3, 5, 4, dtype=torch.float64)
        a, g = torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(3, 6, 7, dtype=torch.float64)
        head_grad = _oracle(head, a, g)[head.weight]  # (B, V, d)
        e = torch.zeros(3, 7, 4, dtype=torch.float64)
        for i in range(3):  # E_i = sum_t onehot(ids_t) b_t^T, padding rows left out
            for t in range(5):
                if ids[i, t] != padding_idx:
                    e[i, ids[i, t]] += b_emb[i, t]
        want = (e * head_grad).sum(dim=(1, 2))
        got = tied_embedding_linear_cross_term(emb, ids, b_emb, head_grad, None)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(tied_embedding_linear_cross_term(emb, ids, b_emb, a, g), want)


def _keep_everything(monkeypatch):
    """Every Linear / Conv1D call with more than one position keeps its gradient."""
    monkeypatch.setattr(linear_mod, "_KEEP_FLOP_FACTOR", 0)
    monkeypatch.setattr(linear_mod, "_KEEP_MEMORY_FACTOR", math.inf)


def _count_kept(monkeypatch):
    calls = []
    for sampler in list(NORM_SAMPLERS.values()):
        keeping = getattr(sampler, KEEPS_GRADS_ATTR, None)
        if keeping is None:
            continue

        def spy(module, activations, backprops, keeping=keeping):
            norms, kept = keeping(module, activations, backprops)
            calls.append((type(module).__name__, kept is not None))
            return norms, kept

        monkeypatch.setattr(sampler, KEEPS_GRADS_ATTR, spy)
    return calls


def _tiny_gpt2(tie):
    return tiny_gpt2(tie)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gpt2_book_keeping_with_kept_grads_matches_the_oracle(monkeypatch, tie, reduction):
    pytest.importorskip("transformers")
    _keep_everything(monkeypatch)
    calls = _count_kept(monkeypatch)
    torch.manual_seed(3)
    model = _tiny_gpt2(tie).double()
    ids, target = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))

    def loss_fn(logits, t):
        return nn.functional.cross_entropy(logits.transpose(1, 2), t, reduction="none").sum(1)

    expected = brute_force_grad_samples(
        model, ids, loss_fn=lambda o, t: loss_fn(o, t).sum(), targets=target
    )
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).norm(dim=0)
    coef = (0.1 / (norms + 1e-6)).clamp(max=1.0)
    assert (coef < 1).all()
    gsm = GradSampleModuleFastGradientClipping(
        copy.deepcopy(model), loss_reduction=reduction, max_grad_norm=0.1
    )
    gsm.max_book_keeping_ratio = math.inf
    autograd_grads = []
    for p in gsm._module.parameters():
        p.register_hook(autograd_grads.append)
    double_backward(gsm, BoundOnly(0.1), loss_fn(gsm(ids), target))
    assert not autograd_grads  # book-kept: no second pass
    # Every Conv1D and LayerNorm kept its gradients, and the head too (tied: with the cross term).
    kept = {name for name, k in calls if k}
    assert {"Conv1D", "LayerNorm", "Linear"} <= kept, calls
    torch.testing.assert_close(gsm.per_sample_gradient_norms, norms, atol=1e-8, rtol=1e-6)
    params = dict(gsm._module.named_parameters())
    for name, g in expected.items():
        want = torch.einsum("b,b...->...", coef, g)
        torch.testing.assert_close(params[name].grad, want, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("scale", [None, 4.0])
def test_a_waiting_kept_head_gives_its_kept_gradient_to_the_materialised_path(scale):
    """If the embedding's call cannot take the ghost norm after the head's call kept its
    gradient, the head's half of the shared weight's per-sample gradient is that kept gradient
    (times the "mean" factor)."""
    emb = nn.Embedding(7, 4)
    head = nn.Linear(4, 7, bias=False)
    head.weight = emb.weight
    gsm = GradSampleModuleFastGradientClipping(nn.Sequential(emb, head))
    tied = gsm._tied[emb]
    kept = torch.randn(3, 7, 4)
    gsm._tied_waiting[id(tied.param)] = (head, [kept], None, scale, torch.ones(3), 3)
    gsm._book_kept[head] = ({tied.param: kept}, None, scale)
    accumulated = []
    gsm._accumulate = lambda grads, max_batch_len: accumulated.append((grads, max_batch_len))
    gsm._materialise_waiting_half(tied)
    assert head not in gsm._book_kept and not gsm._tied_waiting
    ((grads, max_batch_len),) = accumulated
    assert max_batch_len == 3 and set(grads) == {tied.param}
    torch.testing.assert_close(grads[tied.param], kept * (1 if scale is None else scale))


@pytest.mark.parametrize("sequence", [True, False])
def test_a_pass_that_may_keep_gradients_asks_only_for_the_lowest_anchors(sequence, monkeypatch):
    """Asking the norm pass for every hooked output would hold each layer's output gradient to
    the end of the pass, beside the per-sample gradient kept in its place (peak memory): where a
    layer may keep its gradient only the lowest anchor is asked for. A one-position model keeps
    nothing and asks for all of them (no graph walk). The clipped sum matches the oracle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    x = torch.randn(3, 16, 8, dtype=torch.float64) if sequence else torch.randn(3, 8).double()
    r = torch.randn(*x.shape[:-1], 4, dtype=torch.float64)

    def loss_of(out, target):
        return (out * target).sum()

    per_sample = brute_force_grad_samples(model, x, loss_fn=loss_of, targets=r)
    gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model), loss_reduction="sum")
    asked, real = [], torch.autograd.grad

    def recording(outputs, inputs, *args, **kwargs):
        asked.append(len(inputs))
        return real(outputs, inputs, *args, **kwargs)

    planned, plan = [], gsm.plan_book_keeping
    gsm.plan_book_keeping = lambda: planned.append(plan()) or planned[-1]
    tensor_hooks_run_on_captured_gradients()  # its one-off probe calls grad too (cached)
    monkeypatch.setattr(torch.autograd, "grad", recording)
    out = gsm(x)
    loss_per_sample = (out * r).flatten(1).sum(dim=1)
    double_backward(gsm, BoundOnly(0.3), loss_per_sample)
    assert planned == [True]  # book-keeping (a pass without it asks for the lowest anyway)
    assert gsm._may_keep_grads is sequence  # as planned (the plan is spent by the pass)
    assert asked == ([1] if sequence else [2])
    names = dict(gsm.named_parameters())
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
    coef = (0.3 / (norms + 1e-6)).clamp(max=1.0)
    for name, g in per_sample.items():
        expected = torch.einsum("i,i...->...", coef, g)
        torch.testing.assert_close(names["_module." + name].grad, expected)


@pytest.mark.parametrize("rekeyed", [False, True])
def test_a_subclass_that_rekeys_norms_does_not_keep_gradients(rekeyed, monkeypatch):
    """The keeping variant returns norms keyed by the layer's own parameters, bypassing
    ``_norms``: a subclass that overrides ``_norms`` (to re-key them) never takes it, and its
    clipped sums still match the oracle."""

    class Rekeying(GradSampleModuleFastGradientClipping):
        def _norms(self, module, norm_sampler, activations, backprops):
            return super()._norms(module, norm_sampler, activations, backprops)

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    x = torch.randn(3, 16, 8, dtype=torch.float64)
    r = torch.randn(3, 16, 4, dtype=torch.float64)
    per_sample = brute_force_grad_samples(
        model, x, loss_fn=lambda out, t: (out * t).sum(), targets=r
    )
    calls = _count_kept(monkeypatch)
    cls = Rekeying if rekeyed else GradSampleModuleFastGradientClipping
    gsm = cls(copy.deepcopy(model), loss_reduction="sum")
    double_backward(gsm, BoundOnly(0.3), (gsm(x) * r).flatten(1).sum(dim=1))
    assert (calls == []) is rekeyed
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
    coef = (0.3 / (norms + 1e-6)).clamp(max=1.0)
    names = dict(gsm.named_parameters())
    for name, g in per_sample.items():
        expected = torch.einsum("i,i...->...", coef, g)
        torch.testing.assert_close(names["_module." + name].grad, expected)

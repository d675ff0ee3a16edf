"""Book-keeping (Bu et al. 2023): the clipped sum formed from the norm pass's activations and
backprops, with no second backward pass, against the brute-force per-sample oracle."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.embedding_norm_sample import compute_embedding_clipped_sum
from opacus.grad_sample.linear import compute_linear_clipped_sum
from opacus.grad_sample.registry import CLIPPED_SUM_SAMPLERS
from opacus.utils.fast_gradient_clipping_utils import double_backward
from tests.grad_samples.ghost_stubs import BoundOnly
from tests.oracle import brute_force_grad_samples


def _weighted_sum(weights, per_sample):
    return {n: torch.einsum("b,b...->...", weights, g) for n, g in per_sample.items()}


def _layer_oracle(layer, x, backprops):
    """Per-sample gradients of ``<layer(x_i), backprops_i>`` by one backward per sample."""
    per_sample = {n: [] for n, p in layer.named_parameters() if p.requires_grad}
    for i in range(x.shape[0]):
        out = layer(x[i : i + 1])
        named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad((out * backprops[i : i + 1]).sum(), [p for _, p in named])
        for (n, _), g in zip(named, grads):
            per_sample[n].append(g)
    return {n: torch.stack(g) for n, g in per_sample.items()}


def _check_sampler(layer, sampler, x, backprops, weights):
    got = sampler(layer, [x], backprops, weights)
    expected = _weighted_sum(weights, _layer_oracle(layer, x, backprops))
    params = dict(layer.named_parameters())
    assert set(got) == {params[n] for n in expected}
    for n, e in expected.items():
        assert got[params[n]].shape == params[n].shape
        torch.testing.assert_close(got[params[n]], e, rtol=1e-9, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 5),
    middle=st.lists(st.integers(1, 4), max_size=2),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    bias=st.booleans(),
    frozen_weight=st.booleans(),
)
def test_linear_clipped_sum_matches_oracle(batch, middle, d_in, d_out, bias, frozen_weight):
    torch.manual_seed(batch + d_in)
    layer = nn.Linear(d_in, d_out, bias=bias).double()
    layer.weight.requires_grad_(not frozen_weight)
    if frozen_weight and not bias:
        return
    x = torch.randn(batch, *middle, d_in, dtype=torch.float64)
    backprops = torch.randn(batch, *middle, d_out, dtype=torch.float64)
    weights = torch.rand(batch, dtype=torch.float64)
    _check_sampler(layer, compute_linear_clipped_sum, x, backprops, weights)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 5),
    seq=st.integers(1, 6),
    vocab=st.integers(2, 7),
    padding=st.booleans(),
    by_freq=st.booleans(),
)
def test_embedding_clipped_sum_matches_oracle(batch, seq, vocab, padding, by_freq):
    torch.manual_seed(batch * seq + vocab)
    layer = nn.Embedding(
        vocab, 3, padding_idx=0 if padding else None, scale_grad_by_freq=by_freq
    ).double()
    idx = torch.randint(0, vocab, (batch, seq))
    backprops = torch.randn(batch, seq, 3, dtype=torch.float64)
    weights = torch.rand(batch, dtype=torch.float64)
    # The oracle runs each sample alone, so scale_grad_by_freq counts within the sample.
    _check_sampler(layer, compute_embedding_clipped_sum, idx, backprops, weights)


def test_registry_holds_the_clipped_sum_samplers():
    assert CLIPPED_SUM_SAMPLERS[nn.Linear] is compute_linear_clipped_sum
    assert CLIPPED_SUM_SAMPLERS[nn.Embedding] is compute_embedding_clipped_sum
    assert nn.LayerNorm in CLIPPED_SUM_SAMPLERS  # GPT-2 / BERT blocks book-keep
    assert nn.GroupNorm not in CLIPPED_SUM_SAMPLERS  # the tests' layer without a clipped sum


class _TokenModel(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(9, 4, padding_idx=1)
        self.fc1 = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, idx):
        h = self.fc2(self.norm(torch.tanh(self.fc1(self.emb(idx)))))
        return h.sum(dim=1 if self.batch_first else 0)


def _sample_loss(out):
    return out.sin().sum(dim=1)


def _run(model, x, loss_reduction, batch_first=True, max_grad_norm=0.05, plan=None):
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=batch_first, loss_reduction=loss_reduction
    )
    gsm.max_book_keeping_ratio = math.inf  # these small models have more backprops than params
    if plan is not None:
        gsm.plan_book_keeping = plan
    param_grads_in_autograd = []
    for p in model.parameters():
        p.register_hook(lambda g: param_grads_in_autograd.append(g))
    loss = _sample_loss(gsm(x))
    double_backward(gsm, BoundOnly(max_grad_norm), loss)
    gsm.remove_hooks()  # the model can be wrapped again
    return gsm, len(param_grads_in_autograd)


def _expected(model, x, batch_dim=0, max_grad_norm=0.05):
    per_sample = brute_force_grad_samples(
        model, x, batch_dim=batch_dim, loss_fn=lambda out: _sample_loss(out).sum()
    )
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
    coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return _weighted_sum(coef, per_sample), coef


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("max_grad_norm", [0.05, 1e3])
def test_double_backward_book_keeps_linear_and_embedding_models(
    loss_reduction, batch_first, max_grad_norm
):
    torch.manual_seed(0)
    model = _TokenModel(batch_first).double()
    x = torch.randint(0, 9, (4, 6))
    x = x if batch_first else x.t().contiguous()
    expected, coef = _expected(model, x, 0 if batch_first else 1, max_grad_norm)
    assert (coef < 1).all() if max_grad_norm < 1 else (coef == 1).all()
    gsm, autograd_param_grads = _run(model, x, loss_reduction, batch_first, max_grad_norm)
    # No pass computed a parameter gradient through autograd: the sum came from the hooks.
    assert autograd_param_grads == 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-8, atol=1e-10)
    assert gsm._book_kept == {}  # the kept activations and backprops are released


def test_book_keeping_and_second_backward_agree_and_accumulate():
    torch.manual_seed(1)
    model = _TokenModel().double()
    x = torch.randint(0, 9, (5, 3))
    expected, _ = _expected(model, x)
    _, book_kept_grads = _run(model, x, "mean")
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert book_kept_grads == 0
    # A second clipped backward without zero_grad adds up, as autograd would.
    _run(model, x, "mean")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * expected[n], rtol=1e-8, atol=1e-10)
        p.grad = None
    _, second_pass_grads = _run(model, x, "mean", plan=lambda: False)
    assert second_pass_grads == len(list(model.parameters()))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, first[n], rtol=1e-8, atol=1e-10)


class _Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


def _plan(model, x, ratio=math.inf):
    gsm = GradSampleModuleFastGradientClipping(model)
    gsm.max_book_keeping_ratio = ratio
    gsm(x)
    planned = gsm.plan_book_keeping()
    gsm.remove_hooks()  # the model can be wrapped again
    return planned


def test_plan_covers_exactly_the_qualifying_models():
    x = torch.randn(3, 4)
    assert _plan(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), x)
    frozen = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    frozen[0].requires_grad_(False)
    assert _plan(frozen, x)
    # A layer without a clipped-sum sampler, a repeated call, tied weights, an unused layer.
    assert _plan(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)), x)
    assert not _plan(nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3)), x)
    assert not _plan(_Reused(), torch.randn(3, 3))
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert not _plan(tied, x)
    unused = nn.ModuleDict({"used": nn.Linear(4, 2), "unused": nn.Linear(4, 2)})
    gsm = GradSampleModuleFastGradientClipping(unused)
    gsm.max_book_keeping_ratio = math.inf
    gsm.used(x)
    assert not gsm.plan_book_keeping()


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3), nn.Linear(3, 2)),
        lambda: nn.Sequential(_Reused(), nn.Linear(3, 2)),
    ],
    ids=["group_norm", "reused_layer"],
)
def test_models_that_do_not_qualify_take_the_second_backward(build):
    torch.manual_seed(2)
    model = build().double()
    x = torch.randn(4, 4 if isinstance(model[0], nn.Linear) else 3, dtype=torch.float64)
    expected, _ = _expected(model, x)
    _, autograd_param_grads = _run(model, x, "sum")
    assert autograd_param_grads == len(list(model.parameters()))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-8, atol=1e-10)


def test_a_forward_without_the_planned_norm_pass_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    gsm = GradSampleModuleFastGradientClipping(model)
    gsm(torch.randn(3, 4))
    assert gsm.plan_book_keeping()  # 3 * (3 + 2) backprop elements <= 23 parameters
    # Nothing was kept (no norm pass ran): the sum must not be formed from a partial record.
    assert not gsm.accumulate_clipped_sum(torch.ones(3))
    assert all(p.grad is None for p in model.parameters())


class _Fork(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) * self.b(x)


def test_book_keeping_stays_within_the_memory_budget():
    """The kept backprops (one per hooked output element) may not outgrow both the parameters
    and the captured activations (which the graph holds anyway)."""
    cls = GradSampleModuleFastGradientClipping
    assert cls.max_book_keeping_ratio == 1.0 and cls.max_book_keeping_activation_ratio == 1.0
    # Widening layers: per row 2 + 16 = 18 captured inputs, 16 + 40 = 56 outputs; 728 parameters.
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 40))
    x = torch.randn(13, 2)  # 13 * 56 = 728 backprop elements, 234 activations
    assert _plan(model, x, ratio=1.0)
    assert not _plan(model, x, ratio=727 / 728)
    assert not _plan(model, torch.randn(14, 2), ratio=1.0)  # 784 > max(728, 252)
    assert not _plan(model, x, ratio=0)
    # A long sequence through the same layers: no book-keeping by default (5600 > 1800).
    assert not _plan(model, torch.randn(2, 50, 2), ratio=1.0)
    # Narrowing layers over a long sequence: backprops (500) below the activations (700).
    narrowing = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))  # 23 parameters
    assert _plan(narrowing, torch.randn(2, 50, 4), ratio=1.0)
    assert not _plan(narrowing, torch.randn(2, 50, 4), ratio=0)
    # Backprops between once and twice the activations (1700 against 1000): planned with an
    # activation factor of 2 only.
    mild = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 9))
    long_x = torch.randn(2, 50, 2)
    assert not _plan(mild, long_x, ratio=1.0)
    gsm = GradSampleModuleFastGradientClipping(mild)
    gsm.max_book_keeping_activation_ratio = 2.0
    gsm(long_x)
    assert gsm.plan_book_keeping()
    gsm.remove_hooks()
    # One input fed to two layers is held once: 80 activations (not 160) against 120
    # backprops and 30 parameters.
    fork = GradSampleModuleFastGradientClipping(_Fork())
    fork(torch.randn(2, 10, 4))
    assert fork.captured_activation_numel() == 80
    assert not fork.plan_book_keeping()
    fork.max_book_keeping_activation_ratio = 2.0
    assert fork.plan_book_keeping()
    # Over budget, double_backward still gives the clipped sum (second pass).
    torch.manual_seed(3)
    seq_model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 40)).double()
    x = torch.randn(4, 30, 2, dtype=torch.float64)  # 6720 backprops > max(728, 2160)
    expected, _ = _expected(seq_model, x)
    gsm = GradSampleModuleFastGradientClipping(seq_model, loss_reduction="sum")
    planned = []
    plan = gsm.plan_book_keeping
    gsm.plan_book_keeping = lambda: planned.append(plan()) or planned[-1]
    double_backward(gsm, BoundOnly(0.05), _sample_loss(gsm(x)).sum(dim=1))
    assert planned == [False]
    for n, p in seq_model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-8, atol=1e-10)


class _Squared(nn.Module):
    """A Linear whose output the graph saves (``h * h`` keeps ``h``): 8 floats per row."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x):
        h = self.fc(x)
        return h * h


def test_graph_bytes_count_the_saved_tensors_beyond_activations_and_parameters():
    torch.manual_seed(5)
    gsm = GradSampleModuleFastGradientClipping(_Squared())
    gsm.max_book_keeping_activation_ratio = 0.5  # 8 backprops per row > 4 / 2 and > 44 / 6
    out = gsm(torch.randn(6, 4))
    assert gsm.graph_bytes_beyond_activations() == 0  # no root: nothing seen
    assert not gsm.plan_book_keeping()
    gsm.norm_pass_root = out.sum(dim=1).grad_fn
    # The input (captured) and the weight (a parameter) are held anyway: only h counts.
    assert gsm.graph_bytes_beyond_activations() == 6 * 8 * 4
    assert gsm.plan_book_keeping()  # 6 * 8 float32 backprops fit in what the pass frees
    gsm.max_book_keeping_ratio = 0
    assert not gsm.plan_book_keeping()


def test_double_backward_book_keeps_when_the_graph_frees_enough():
    """Over the parameter and activation budgets, the graph's own saved tensors allow it."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(2, 16), nn.GELU(), nn.Linear(16, 40)).double()
    x = torch.randn(3, 30, 2, dtype=torch.float64)  # 5040 backprops > max(728, 1620)
    expected, _ = _expected(model, x)
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="mean")
    planned = []
    plan = gsm.plan_book_keeping
    gsm.plan_book_keeping = lambda: planned.append((plan(), gsm.norm_pass_root)) or planned[-1][0]
    double_backward(gsm, BoundOnly(0.05), _sample_loss(gsm(x)).sum(dim=1))
    # GELU saves its input (1440) and sin its input (3600): 5040 elements freed by the pass.
    assert planned[0][0] and planned[0][1] is not None
    assert gsm.norm_pass_root is None  # released after planning: it holds the graph
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-8, atol=1e-10)


class _FreqScaled(nn.Module):
    def __init__(self, norm: bool):
        super().__init__()
        self.emb = nn.Embedding(5, 3, scale_grad_by_freq=True)
        # GroupNorm has no clipped-sum sampler: it rules book-keeping out.
        self.norm = nn.GroupNorm(1, 3) if norm else nn.Identity()
        self.fc = nn.Linear(3, 2)

    def forward(self, idx):
        h = self.norm(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        return self.fc(h).sum(dim=1)


def test_scale_grad_by_freq_is_book_kept_whatever_the_memory_budget():
    """Torch's batch backward counts lookups over the batch (coupling samples); the per-sample
    gradient counts within the sample. Book-keeping follows the per-sample definition."""
    torch.manual_seed(4)
    model = _FreqScaled(norm=False).double()
    x = torch.randint(0, 5, (4, 40))  # far over the default memory budget
    expected, coef = _expected(model, x)
    assert (coef < 1).all()
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="mean")
    assert gsm.batch_coupled_layers() == ["emb"]
    double_backward(gsm, BoundOnly(0.05), _sample_loss(gsm(x)))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-8, atol=1e-10)


def test_scale_grad_by_freq_without_book_keeping_is_refused():
    model = _FreqScaled(norm=True)
    gsm = GradSampleModuleFastGradientClipping(model)
    loss = _sample_loss(gsm(torch.randint(0, 5, (3, 4))))
    with pytest.raises(NotImplementedError, match="'emb'.*scale_grad_by_freq"):
        double_backward(gsm, BoundOnly(1.0), loss)
    assert all(p.grad is None for p in model.parameters())
    model.emb.weight.requires_grad_(False)  # a frozen embedding couples nothing
    assert gsm.batch_coupled_layers() == []


def test_fsdp_wrapper_never_book_keeps_and_tp_wrapper_does():
    from opacus.grad_sample import (
        GradSampleModuleFastGradientClippingFSDP,
        GradSampleModuleFastGradientClippingTP,
    )

    x = torch.randn(3, 4)
    for cls, expected in [
        (GradSampleModuleFastGradientClippingFSDP, False),
        (GradSampleModuleFastGradientClippingTP, True),
    ]:
        gsm = cls(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        gsm.max_book_keeping_ratio = math.inf
        gsm(x)
        assert gsm.plan_book_keeping() is expected, cls.__name__


def test_torch_ddp_anywhere_around_the_ghost_module_disables_book_keeping(monkeypatch):
    """DDP's all-reduce runs in the backward pass; detection is by type (no process group)."""
    from opacus.grad_sample import ghost_loss as fgc

    class FakeDDP(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", FakeDDP)
    inner = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    plain = GradSampleModuleFastGradientClipping(inner)
    assert not fgc._under_torch_ddp(plain, plain)
    outer = FakeDDP(plain)
    assert fgc._under_torch_ddp(outer, plain)
    wrapped_ddp = GradSampleModuleFastGradientClipping(FakeDDP(nn.Linear(4, 2)))
    assert fgc._under_torch_ddp(wrapped_ddp, wrapped_ddp)
    # End to end: the second pass runs (parameter gradients flow through autograd).
    wrapped_ddp.max_book_keeping_ratio = math.inf
    hits = []
    for p in wrapped_ddp.parameters():
        p.register_hook(lambda g: hits.append(g))
    loss = _sample_loss(wrapped_ddp(torch.randn(3, 4)))
    double_backward(wrapped_ddp, BoundOnly(1.0), loss)
    assert len(hits) == 2

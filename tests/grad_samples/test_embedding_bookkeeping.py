"""``nn.Embedding`` in hooks mode: book-kept norms / clipped sum, and the partially zeroed buffer.

The hooks hand the optimizer each Embedding weight's exact per-sample norms and a clipped-sum
function computed from the indices and output gradients (never reading the dense
``(B, vocab, dim)`` per-sample gradient), and the grad sampler zeroes only the rows of its
reused buffer that the previous step wrote.  Oracles: ``tests.oracle.brute_force_grad_samples``
(one ``torch.autograd.grad`` per sample) for every per-sample gradient, norm and clipped sum, and
the sample-by-sample DP-SGD of ``tests.optimizers.dp_reference`` for optimizer steps.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample import GradSampleModule, buffers
from opacus.grad_sample.buffers import record_written_rows, reusable_row_zeros
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer, clipping
from opacus.optimizers.optimizer import GRAD_SAMPLE_NORMS_ATTR, cached_grad_sample_norms
from tests.grad_samples.test_embedding import Bags
from tests.optimizers.dp_reference import clipped_sum_flat, clipped_sum_per_layer
from tests.oracle import brute_force_grad_samples


def _tanh_dot(out, r):
    """A sample's loss: non-linear in the lookup, so backprops differ per position."""
    return (out.tanh() * r).sum()


def _step(gsm, idx, r, reduction):
    """One forward/backward of the hooked lookup with the summed (or averaged) loss."""
    out = gsm(idx).tanh() * r
    loss = out.sum() if reduction == "sum" else out.sum() / idx.shape[0]
    loss.backward()


def _oracle(layer, idx, r, batch_dim=0):
    """Per-sample gradients of an unhooked twin of ``layer`` (same settings and weights)."""
    twin = nn.Embedding(
        layer.num_embeddings,
        layer.embedding_dim,
        padding_idx=layer.padding_idx,
        max_norm=layer.max_norm,
        scale_grad_by_freq=layer.scale_grad_by_freq,
    ).to(layer.weight.dtype)
    twin.load_state_dict(layer.state_dict())
    if batch_dim == 0:
        loss_fn = _tanh_dot
    else:  # time-major: each sample's (T, 1, dim) output against its (1, T, dim) targets
        r = r.movedim(batch_dim, 0)

        def loss_fn(out, target):
            return _tanh_dot(out.movedim(batch_dim, 0), target)

    gs = brute_force_grad_samples(twin, idx, loss_fn=loss_fn, targets=r, batch_dim=batch_dim)
    return gs["weight"]


def _check_cache(weight, expected, dtype):
    """The cache exists, and its norms / clipped sum are those of the oracle's gradients."""
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    cached = cached_grad_sample_norms(weight, weight.grad_sample)
    assert cached is not None
    norms, clipped_sum = cached
    assert norms.dtype == dtype and norms.shape == expected.shape[:1]
    torch.testing.assert_close(norms, expected.flatten(1).norm(dim=1), **tol)
    factors = torch.rand(expected.shape[0], dtype=dtype) + 0.1
    got = clipped_sum(factors)
    torch.testing.assert_close(got, torch.einsum("i,i...->...", factors, expected), **tol)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 5),
    seq=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    vocab=st.integers(1, 7),
    dim=st.integers(1, 4),
    padding=st.booleans(),
    by_freq=st.booleans(),
    double=st.booleans(),
    reduction=st.sampled_from(["sum", "mean"]),
    data=st.data(),
)
def test_grad_sample_and_cache_match_oracle_over_steps(
    batch, seq, vocab, dim, padding, by_freq, double, reduction, data
):
    """Small vocabularies force repeated indices within a sample; every buffer is pooled (and
    so partially zeroed from the second step on), and each step draws new indices."""
    dtype = torch.float64 if double else torch.float32
    torch.manual_seed(batch * 7 + vocab)
    padding_idx = data.draw(st.integers(-vocab, vocab - 1)) if padding else None
    layer = nn.Embedding(vocab, dim, padding_idx=padding_idx, scale_grad_by_freq=by_freq)
    layer = layer.to(dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(buffers, "MIN_POOLED_BYTES", 0)
        gsm = GradSampleModule(layer, loss_reduction=reduction)
        for _ in range(3):
            idx = torch.randint(0, vocab, (batch, *seq))
            r = torch.randn(batch, *seq, dim, dtype=dtype)
            layer.weight.grad_sample = None
            _step(gsm, idx, r, reduction)
            expected = _oracle(layer, idx, r)
            tol = dict(rtol=1e-12, atol=1e-12) if double else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.weight.grad_sample, expected, **tol)
            if reduction == "mean" and vocab < math.prod(seq):
                # The "mean" factor multiplies the smaller per-sample gradient instead of the
                # backprops (ReductionScale): nothing to spare, no book-keeping.
                assert not hasattr(layer.weight, GRAD_SAMPLE_NORMS_ATTR)
            else:
                _check_cache(layer.weight, expected, dtype)
        gsm.remove_hooks()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_layouts_and_index_dtypes(batch_first, index_dtype):
    torch.manual_seed(0)
    layer = nn.Embedding(6, 3, padding_idx=2).double()
    gsm = GradSampleModule(layer, batch_first=batch_first, loss_reduction="sum")
    idx = torch.randint(0, 6, (4, 5), dtype=index_dtype)
    r = torch.randn(4, 5, 3, dtype=torch.float64)
    if not batch_first:
        idx, r = idx.t().contiguous(), r.transpose(0, 1).contiguous()
    (gsm(idx).tanh() * r).sum().backward()
    expected = _oracle(layer, idx, r, batch_dim=0 if batch_first else 1)
    torch.testing.assert_close(layer.weight.grad_sample, expected, rtol=1e-12, atol=1e-12)
    _check_cache(layer.weight, expected, torch.float64)


def test_max_norm_cache_describes_the_grad_sample():
    """``max_norm`` renormalises looked-up rows in place during forward; the cache still
    describes the per-sample gradients of the renormalised lookup."""
    torch.manual_seed(1)
    layer = nn.Embedding(8, 4, max_norm=0.5).double()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    gsm = GradSampleModule(layer, loss_reduction="sum")
    idx = torch.randint(0, 8, (5, 6))
    r = torch.randn(5, 6, 4, dtype=torch.float64)
    (gsm(idx).tanh() * r).sum().backward()
    # The renormalised rows are the weights the oracle must differentiate (a no-op renorm now).
    expected = _oracle(layer, idx, r)
    torch.testing.assert_close(layer.weight.grad_sample, expected, rtol=1e-12, atol=1e-12)
    _check_cache(layer.weight, expected, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_not_cached(dtype):
    layer = nn.Embedding(10, 4).to(dtype)
    gsm = GradSampleModule(layer, loss_reduction="sum")
    gsm(torch.randint(0, 10, (3, 5))).float().pow(2).sum().backward()
    assert layer.weight.grad_sample.dtype == dtype
    assert cached_grad_sample_norms(layer.weight, layer.weight.grad_sample) is None


def test_frozen_embedding_has_no_cache_and_no_grad_sample():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    model[0].weight.requires_grad_(False)
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm(torch.randint(0, 10, (3, 3))).sum().backward()
    assert getattr(model[0].weight, "grad_sample", None) is None
    assert not hasattr(model[0].weight, GRAD_SAMPLE_NORMS_ATTR)


# ----------------------------------------------------------------- the DPOptimizer step
B, VOCAB, DIM, SEQ = 6, 11, 4, 5


class _TokenClassifier(nn.Module):
    """Embedding -> mean over tokens -> Linear; ``tied`` / ``twice``: the cases the cache must
    refuse (a weight shared by two layers, a layer called twice in one forward)."""

    def __init__(self, tied=False, twice=False, padding_idx=0, scale_grad_by_freq=True):
        super().__init__()
        self.emb = nn.Embedding(
            VOCAB, DIM, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq
        )
        if tied:
            self.other = nn.Embedding(VOCAB, DIM)
            self.other.weight = self.emb.weight
        self.twice = twice
        self.tied = tied
        self.fc = nn.Linear(DIM, 3)

    def forward(self, idx):
        h = self.emb(idx)
        if self.tied:
            h = h + self.other(idx.flip(1)).sin()
        if self.twice:
            h = h + self.emb(idx.roll(1, dims=1)).sin()
        return self.fc(h.tanh().mean(dim=1))


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (B, SEQ), generator=g)
    idx[:, 0] = 0  # a padding position in every sample
    return idx, torch.randint(0, 3, (B,), generator=g)


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _oracle_grads(model, x, y):
    gs = brute_force_grad_samples(model, x, loss_fn=_ce, targets=y)
    return [gs[n] for n, p in model.named_parameters() if p.requires_grad]


def _make(per_layer=False, reduction="sum", noise=0.0, seed=0, **model_kwargs):
    torch.manual_seed(seed)
    model = _TokenClassifier(**model_kwargs).double()
    reference = copy.deepcopy(model)
    gsm = GradSampleModule(model, loss_reduction=reduction)
    n = len([p for p in model.parameters() if p.requires_grad])
    c = [0.05] * n if per_layer else 0.1  # below the typical norm: most samples clipped
    opt = (DPPerLayerOptimizer if per_layer else DPOptimizer)(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=noise,
        max_grad_norm=c,
        expected_batch_size=B,
        loss_reduction=reduction,
        generator=torch.Generator().manual_seed(123) if noise else None,
    )
    return model, reference, gsm, opt, c


def _backward(gsm, x, y, reduction):
    F.cross_entropy(gsm(x), y, reduction=reduction).backward()


def _check_update(model, before, sums, reduction, batches=1):
    for (name, p), b, s in zip(model.named_parameters(), before, sums):
        expected = s / (B * batches) if reduction == "mean" else s
        torch.testing.assert_close(b - p.detach(), expected, atol=1e-10, rtol=1e-8, msg=name)


def _count_dense_reads(monkeypatch):
    """Calls of the optimizer's dense norm / weighted sum on a 3-D per-sample gradient."""
    calls = []
    for name in ("per_sample_param_norms", "weighted_sum"):
        original = getattr(clipping, name)

        def counting(*args, _original=original, _name=name):
            if args[-1].dim() > 2:  # the (B, vocab, dim) or (B, out, in) weight gradients
                calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(clipping, name, counting)
    return calls


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_dp_step_uses_the_cache_and_matches_the_oracle(monkeypatch, per_layer, reduction):
    model, reference, gsm, opt, c = _make(per_layer, reduction)
    dense_reads = _count_dense_reads(monkeypatch)
    for step in range(3):  # later steps reuse (and partially zero) the pooled buffers
        x, y = _data(step + 1)
        grads = _oracle_grads(reference, x, y)
        sums = clipped_sum_per_layer(grads, c) if per_layer else clipped_sum_flat(grads, c)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        _backward(gsm, x, y, reduction)
        assert cached_grad_sample_norms(model.emb.weight, model.emb.weight.grad_sample)
        opt.step()
        _check_update(model, before, sums, reduction)
        reference.load_state_dict(model.state_dict())
    assert dense_reads == []  # the per-sample gradients were never read by the optimizer


def test_noisy_dp_step_matches_the_brute_force_step_with_the_same_seed():
    """Noise from the same seeded generator: the step equals DP-SGD on the oracle's gradients
    (``p.grad_sample`` set by hand, which the optimizer reads densely)."""
    model, reference, gsm, opt, _ = _make(noise=1.3)
    ref_opt = DPOptimizer(
        torch.optim.SGD(reference.parameters(), lr=1.0),
        noise_multiplier=1.3,
        max_grad_norm=0.1,
        expected_batch_size=B,
        loss_reduction="sum",
        generator=torch.Generator().manual_seed(123),
    )
    for step in range(2):
        x, y = _data(step + 5)
        grads = _oracle_grads(reference, x, y)
        opt.zero_grad()
        ref_opt.zero_grad()
        _backward(gsm, x, y, "sum")
        assert cached_grad_sample_norms(model.emb.weight, model.emb.weight.grad_sample)
        for p, g in zip(reference.parameters(), grads):
            p.grad_sample = g
        opt.step()
        ref_opt.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("case", ["tied", "twice"])
def test_shared_weight_or_repeated_call_is_not_cached(monkeypatch, case):
    model, reference, gsm, opt, c = _make(**{case: True})
    dense_reads = _count_dense_reads(monkeypatch)
    x, y = _data(3)
    sums = clipped_sum_flat(_oracle_grads(reference, x, y), c)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(gsm, x, y, "sum")
    assert cached_grad_sample_norms(model.emb.weight, model.emb.weight.grad_sample) is None
    opt.step()
    assert "weighted_sum" in dense_reads  # the dense result was used
    _check_update(model, before, sums, "sum")


def test_gradient_accumulation_is_not_cached():
    model, reference, gsm, opt, c = _make(reduction="sum")
    (x1, y1), (x2, y2) = _data(1), _data(2)
    grads = [
        torch.cat([a, b])
        for a, b in zip(_oracle_grads(reference, x1, y1), _oracle_grads(reference, x2, y2))
    ]
    before = [p.detach().clone() for p in model.parameters()]
    _backward(gsm, x1, y1, "sum")
    first = model.emb.weight.grad_sample
    assert cached_grad_sample_norms(model.emb.weight, first) is not None
    _backward(gsm, x2, y2, "sum")
    chunks = model.emb.weight.grad_sample
    assert isinstance(chunks, list) and len(chunks) == 2 and chunks[0] is first
    assert not hasattr(model.emb.weight, GRAD_SAMPLE_NORMS_ATTR)
    torch.testing.assert_close(torch.cat(chunks), grads[0], rtol=1e-12, atol=1e-12)
    opt.step()
    _check_update(model, before, clipped_sum_flat(grads, c), "sum")


@pytest.mark.parametrize("how", ["in_place", "row", "reassign"])
def test_user_modified_grad_sample_is_used_densely(how):
    model, reference, gsm, opt, c = _make()
    x, y = _data(4)
    grads = _oracle_grads(reference, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(gsm, x, y, "sum")
    weight = model.emb.weight
    if how == "in_place":
        weight.grad_sample.mul_(3.0)
        grads[0] = grads[0] * 3.0
    elif how == "row":
        weight.grad_sample[2, 5] += 0.5
        grads[0] = grads[0].clone()
        grads[0][2, 5] += 0.5
    else:
        weight.grad_sample = weight.grad_sample * 3.0
        grads[0] = grads[0] * 3.0
    assert cached_grad_sample_norms(weight, weight.grad_sample) is None
    opt.step()
    _check_update(model, before, clipped_sum_flat(grads, c), "sum")


# ----------------------------------------------------------- the partially zeroed buffer
def _dense_reference(idx, backprops, vocab, padding_idx=None):
    """Sample by sample, position by position: the definition of the lookup's gradient."""
    out = torch.zeros(idx.shape[0], vocab, backprops.shape[-1], dtype=backprops.dtype)
    for i in range(idx.shape[0]):
        for t in range(idx.shape[1]):
            if idx[i, t] != padding_idx:
                out[i, idx[i, t]] += backprops[i, t]
    return out


class _Capture(nn.Module):
    def __init__(self, vocab, dim, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)

    def forward(self, idx):
        out = self.emb(idx)
        out.retain_grad()
        self.out = out
        return out


def _buffer_step(gsm, model, idx, release=True):
    model.emb.weight.grad_sample = None
    gsm(idx).sin().sum().backward()
    gs = model.emb.weight.grad_sample
    expected = _dense_reference(idx, model.out.grad, gs.shape[1], model.emb.padding_idx)
    assert torch.equal(gs, expected)
    if release:
        model.emb.weight.grad_sample = None
    return gs


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_buffer_is_reused_and_exact_over_steps(monkeypatch, padding_idx):
    """(4, 4096, 16) float32 = 1 MiB: pooled with the default threshold; from the second step
    on only the rows of the previous step are zeroed (``padding_idx``'s row zeroing included)."""
    torch.manual_seed(2)
    partial = []
    written_rows = buffers._written_rows

    def spying(*args):
        rows = written_rows(*args)
        partial.append(rows is not None)
        return rows

    monkeypatch.setattr(buffers, "_written_rows", spying)
    model = _Capture(4096, 16, padding_idx)
    gsm = GradSampleModule(model, loss_reduction="sum")
    ptr = None
    for step in range(4):
        idx = torch.randint(0, 4096, (4, 7))
        idx[:, 2] = 3
        gs = _buffer_step(gsm, model, idx)
        assert ptr is None or gs.data_ptr() == ptr
        ptr = gs.data_ptr()
        del gs
    assert partial == [False, True, True, True]


@pytest.mark.parametrize("edit", ["add", "fill_row", "fill_all", "zero_row"])
def test_user_edit_of_the_buffer_between_steps_is_zeroed(edit):
    torch.manual_seed(3)
    model = _Capture(4096, 16)
    gsm = GradSampleModule(model, loss_reduction="sum")
    gs = _buffer_step(gsm, model, torch.randint(0, 4096, (4, 7)), release=False)
    if edit == "add":
        gs[1, 100:200] += 1.0
    elif edit == "fill_row":
        gs[0, 4000].fill_(7.0)
    elif edit == "fill_all":
        gs.fill_(2.0)
    else:  # a write that changes nothing the record knows of still voids it
        gs[2, 9].zero_()
    ptr = gs.data_ptr()
    model.emb.weight.grad_sample = None
    del gs
    again = _buffer_step(gsm, model, torch.randint(0, 4096, (4, 7)), release=False)
    assert again.data_ptr() == ptr  # the same buffer, zeroed in full, then written


def test_a_held_buffer_is_not_touched_and_the_next_one_is_exact():
    torch.manual_seed(4)
    model = _Capture(4096, 16)
    gsm = GradSampleModule(model, loss_reduction="sum")
    held = _buffer_step(gsm, model, torch.randint(0, 4096, (4, 7)), release=False)
    snapshot = held.clone()
    model.emb.weight.grad_sample = None  # ``held`` keeps the buffer: a new one is made
    second = _buffer_step(gsm, model, torch.randint(0, 4096, (4, 7)), release=False)
    assert second.data_ptr() != held.data_ptr()
    assert torch.equal(held, snapshot)
    del held, second
    model.emb.weight.grad_sample = None
    for _ in range(2):  # the pool now keeps the second buffer, partially zeroed from here on
        _buffer_step(gsm, model, torch.randint(0, 4096, (4, 7)))
    _buffer_step(gsm, model, torch.randint(0, 4096, (5, 3)))  # another batch size
    _buffer_step(gsm, model, torch.randint(0, 4096, (5, 9)))


@torch.no_grad()  # as in a backward hook (grad mode would get unpooled tensors)
def test_partial_zeroing_is_taken_only_while_the_record_holds():
    """Direct check of the mechanism: a write that bypasses the version counter (``.data``)
    outside the recorded rows survives ``reusable_row_zeros`` (only the recorded rows were
    zeroed), and any versioned in-place write makes it zero everything."""
    owner = nn.Linear(1, 1)
    shape = (2, 8192, 16)  # 1 MiB of float32: pooled
    out = reusable_row_zeros(owner, "w", shape, dtype=torch.float32, device="cpu")
    assert not out.any()
    index = torch.tensor([[1, 5], [5, 7]])
    out.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, 16), torch.ones(2, 2, 16))
    rows = (torch.arange(2).unsqueeze(1) * 8192 + index).reshape(-1)  # rows of the (N, 16) view
    record_written_rows(owner, "w", out, rows)
    rows[0] = 6  # the caller's rows may change: the record keeps its own copy
    out.data[0, 100] = 9.0  # no version bump: invisible to the record (a stand-in)
    ptr = out.data_ptr()
    del out
    again = reusable_row_zeros(owner, "w", shape, dtype=torch.float32, device="cpu")
    assert again.data_ptr() == ptr and again._base is not None
    assert not again[:, [1, 5, 7]].any()  # the recorded rows are zero ...
    assert (again[0, 100] == 9.0).all()  # ... and nothing else was written
    record_written_rows(owner, "w", again, torch.tensor([0]))
    again[1, 200] += 1.0  # a versioned write: the record is void
    del again
    third = reusable_row_zeros(owner, "w", shape, dtype=torch.float32, device="cpu")
    assert not third.any()
    # No record at all (e.g. another sampler wrote the slot): zeroed in full too.
    third.fill_(1.0)
    del third
    assert not reusable_row_zeros(owner, "w", shape, dtype=torch.float32, device="cpu").any()


# ------------------------------------------------------------------------ nn.EmbeddingBag
def _bag_twin(bag):
    twin = nn.EmbeddingBag(
        bag.num_embeddings,
        bag.embedding_dim,
        mode=bag.mode,
        padding_idx=bag.padding_idx,
        include_last_offset=bag.include_last_offset,
    ).to(bag.weight.dtype)
    twin.load_state_dict(bag.state_dict())
    return twin


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    max_len=st.integers(1, 5),
    vocab=st.integers(2, 6),
    mode=st.sampled_from(["sum", "mean"]),
    padding=st.booleans(),
    include_last_offset=st.booleans(),
    weighted=st.booleans(),
    flat=st.booleans(),
    double=st.booleans(),
    data=st.data(),
)
def test_embedding_bag_grad_sample_and_cache_match_oracle_over_steps(
    batch, max_len, vocab, mode, padding, include_last_offset, weighted, flat, double, data
):
    """2-D input or 1-D input with offsets (empty bags included), per-sample weights, repeated
    indices in a bag; pooled (partially zeroed) buffers over several steps."""
    dtype = torch.float64 if double else torch.float32
    tol = dict(rtol=1e-10, atol=1e-12) if double else dict(rtol=1e-5, atol=1e-5)
    torch.manual_seed(batch * 5 + vocab)
    weighted = weighted and mode == "sum"  # PyTorch allows per_sample_weights with sum only.
    bag = nn.EmbeddingBag(
        vocab,
        3,
        mode=mode,
        padding_idx=data.draw(st.integers(0, vocab - 1)) if padding else None,
        include_last_offset=include_last_offset and flat,
    ).to(dtype)
    model = Bags(bag) if flat else bag
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(buffers, "MIN_POOLED_BYTES", 0)
        gsm = GradSampleModule(model, loss_reduction="sum")
        for _ in range(3):
            padded = torch.randint(0, vocab, (batch, max_len))
            lengths = data.draw(st.lists(st.integers(0, max_len), min_size=batch, max_size=batch))
            weights = torch.randn(batch, max_len, dtype=dtype) if weighted else None
            if flat:
                inputs, dims = [padded, torch.tensor(lengths)], [0, 0]
            else:
                inputs, dims = [padded, None], [0, None]
            if weighted:
                inputs, dims = inputs + [weights], dims + [0]
            r = torch.randn(batch, 3, dtype=dtype)
            bag.weight.grad_sample = None
            (gsm(*inputs).tanh() * r).sum().backward()
            twin = _bag_twin(bag)
            oracle_model = Bags(twin) if flat else twin
            expected = brute_force_grad_samples(
                oracle_model, inputs, loss_fn=_tanh_dot, targets=r, batch_dim=dims
            )["bag.weight" if flat else "weight"]
            torch.testing.assert_close(bag.weight.grad_sample, expected, **tol)
            _check_cache(bag.weight, expected, dtype)
        gsm.remove_hooks()


class _BagClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, DIM, mode="mean", padding_idx=0)
        self.fc = nn.Linear(DIM, 3)

    def forward(self, idx):
        return self.fc(self.bag(idx).tanh())


def test_embedding_bag_dp_step_uses_the_cache_and_matches_the_oracle(monkeypatch):
    torch.manual_seed(5)
    model = _BagClassifier().double()
    reference = copy.deepcopy(model)
    gsm = GradSampleModule(model, loss_reduction="sum")
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        expected_batch_size=B,
        loss_reduction="sum",
    )
    dense_reads = _count_dense_reads(monkeypatch)
    for step in range(3):
        x, y = _data(step + 7)
        sums = clipped_sum_flat(_oracle_grads(reference, x, y), 0.1)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        _backward(gsm, x, y, "sum")
        assert cached_grad_sample_norms(model.bag.weight, model.bag.weight.grad_sample)
        opt.step()
        _check_update(model, before, sums, "sum")
        reference.load_state_dict(model.state_dict())
    assert dense_reads == []


@pytest.mark.parametrize("bag", [False, True])
def test_input_changed_in_place_before_the_step_does_not_change_it(bag):
    """A data loader may refill the same input tensor: the book-kept clipped sum (formed at the
    step) uses the indices of the backward pass, as the per-sample gradients do."""
    torch.manual_seed(6)
    model = (_BagClassifier() if bag else _TokenClassifier()).double()
    reference = copy.deepcopy(model)
    gsm = GradSampleModule(model, loss_reduction="sum")
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        expected_batch_size=B,
        loss_reduction="sum",
    )
    x, y = _data(9)
    sums = clipped_sum_flat(_oracle_grads(reference, x, y), 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(gsm, x, y, "sum")
    weight = (model.bag if bag else model.emb).weight
    assert cached_grad_sample_norms(weight, weight.grad_sample)
    x.copy_(_data(10)[0])
    opt.step()
    _check_update(model, before, sums, "sum")

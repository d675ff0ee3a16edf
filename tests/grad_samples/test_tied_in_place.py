"""A weight shared by an ``nn.Embedding`` and an ``nn.Linear`` head (GPT-2's ``wte`` /
``lm_head``) in hooks mode: the second layer's per-sample gradient is added in place into the
first one's pooled buffer (the embedding scatters its rows straight into it), never into a tensor
anyone else holds.

Oracle: ``tests.oracle.brute_force_grad_samples`` (one backward per sample) for every pass; a
snapshot for tensors handed out earlier. Buffers are pooled from 0 bytes here (monkeypatched), so
the tiny models take the same path as the full-size LM.
"""

import copy

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModule, buffers
from opacus.grad_sample import embedding as embedding_sampler
from opacus.grad_sample.buffers import is_unshared_buffer, reusable_empty
from tests.grad_samples.tiny_lm import tiny_gpt2
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples


@pytest.fixture(autouse=True)
def pool_everything(monkeypatch):
    monkeypatch.setattr(buffers, "MIN_POOLED_BYTES", 0)
    yield
    buffers.release_buffers()


class _TiedLM(nn.Module):
    """ids -> wte -> tanh(fc) -> lm_head (weight = wte.weight): the head's hook runs first."""

    def __init__(self, vocab=9, dim=4):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.fc(self.wte(ids))))


class _EmbeddingLast(nn.Module):
    """The head is applied first in the forward, the lookup last: the embedding's hook runs first
    and the head's gradient is the one added into the embedding's buffer."""

    def __init__(self, vocab=9, dim=4):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, inputs):
        ids, x = inputs[:, :, 0].long(), inputs[:, :, 1:]
        h = self.lm_head(x)  # (B, T, vocab)
        e = self.wte(ids)  # (B, T, dim)
        return e * h.mean(-1, keepdim=True)


def _tiny_gpt2():
    return tiny_gpt2(tie=True)


def _loss(out):
    return out.sin().sum()


def _batch(kind, batch, seq, vocab):
    ids = torch.randint(0, vocab, (batch, seq))
    if kind != "embedding_last":
        return ids
    x = torch.randn(batch, seq, 4, dtype=torch.float64)
    return torch.cat([ids.unsqueeze(-1).double(), x], dim=-1)


BUILDERS = {
    "tied_lm": (_TiedLM, 9),
    "embedding_last": (_EmbeddingLast, 9),
    "gpt2": (_tiny_gpt2, 11),
}


def _wte(model):
    return model.lm.transformer.wte if hasattr(model, "lm") else model.wte


def _shared(model):
    return _wte(model).weight


def _wrap(model):
    """``GradSampleModule(model)`` and an unhooked twin for the oracle (whose backward passes
    would otherwise run the hooks)."""
    twin = copy.deepcopy(model)
    return GradSampleModule(model, loss_reduction="sum"), twin


def _oracle(twin, x):
    return brute_force_grad_samples(twin, x, loss_fn=_loss)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_tied_weight_matches_the_oracle_over_steps_and_leaves_held_tensors_alone(kind):
    build, vocab = BUILDERS[kind]
    torch.manual_seed(0)
    model = build().double()
    gsm, twin = _wrap(model)
    shared = _shared(model)
    held, snapshot = None, None
    for step in range(3):
        x = _batch(kind, 3, 5, vocab)
        for p in model.parameters():
            p.grad_sample = None
            p.grad = None
        _loss(gsm(x)).backward()
        got = {n: p.grad_sample for n, p in model.named_parameters()}
        assert_grad_samples_close(got, _oracle(twin, x), atol=1e-10, rtol=1e-8)
        if held is not None:
            # The user kept last step's per-sample gradient: this step did not write into it.
            assert torch.equal(held, snapshot)
            assert shared.grad_sample.data_ptr() != held.data_ptr()
        if step == 0:
            held = shared.grad_sample
            snapshot = held.clone()


@pytest.mark.parametrize("kind", ["tied_lm", "gpt2"])
def test_the_embedding_scatters_into_the_heads_buffer(kind):
    """The fast path is taken: the embedding never allocates a buffer of its own, and the
    shared weight's per-sample gradient is the head's pooled buffer."""
    build, vocab = BUILDERS[kind]
    torch.manual_seed(1)
    model = build().double()
    gsm, twin = _wrap(model)
    wte = _wte(model)
    calls = []
    scatter = embedding_sampler._scatter_rows

    def counting(*args, **kwargs):
        calls.append(args[0])
        return scatter(*args, **kwargs)

    embedding_sampler._scatter_rows = counting
    try:
        x = _batch(kind, 2, 4, vocab)
        _loss(gsm(x)).backward()
    finally:
        embedding_sampler._scatter_rows = scatter
    assert wte not in calls  # no (B, vocab, dim) buffer of the embedding's own
    assert is_unshared_buffer(wte.weight.grad_sample)
    assert_grad_samples_close(
        {n: p.grad_sample for n, p in model.named_parameters()},
        _oracle(twin, x),
        atol=1e-10,
        rtol=1e-8,
    )


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_gradient_accumulation_keeps_one_chunk_per_pass(kind):
    build, vocab = BUILDERS[kind]
    torch.manual_seed(2)
    model = build().double()
    gsm, twin = _wrap(model)
    shared = _shared(model)
    batches = [_batch(kind, b, 4, vocab) for b in (3, 2, 3)]
    expected = []
    first_chunk = None
    for i, x in enumerate(batches):
        _loss(gsm(x)).backward()
        expected.append(_oracle(twin, x))
        if i == 0:
            first_chunk = shared.grad_sample.clone()
    for name, p in model.named_parameters():
        chunks = p.grad_sample
        assert isinstance(chunks, list) and len(chunks) == 3, name
        for chunk, exp in zip(chunks, expected):
            torch.testing.assert_close(chunk, exp[name], atol=1e-10, rtol=1e-8)
    assert torch.equal(shared.grad_sample[0], first_chunk)


def test_padding_idx_and_scale_grad_by_freq_keep_the_separate_path():
    for kwargs in ({"padding_idx": 2}, {"scale_grad_by_freq": True}):
        torch.manual_seed(3)
        model = _TiedLM().double()
        model.wte = nn.Embedding(9, 4, **kwargs).double()
        model.lm_head.weight = model.wte.weight
        gsm, twin = _wrap(model)
        x = torch.randint(0, 9, (3, 5))
        x[0, 0] = x[0, 1] = 2
        _loss(gsm(x)).backward()
        got = {n: p.grad_sample for n, p in model.named_parameters()}
        assert_grad_samples_close(got, _oracle(twin, x), atol=1e-10, rtol=1e-8)


def test_is_unshared_buffer():
    owner = nn.Linear(1, 1)
    with torch.no_grad():  # (grad mode gets plain tensors: ``out=`` would break autograd)
        buf = reusable_empty(owner, "w", (2, 3), dtype=torch.float32, device="cpu")
    assert is_unshared_buffer(buf)
    view = buf[0]  # another tensor on the storage
    assert not is_unshared_buffer(buf)
    del view
    assert is_unshared_buffer(buf)
    assert not is_unshared_buffer(torch.zeros(2, 3))  # not from the pool
    assert not is_unshared_buffer(torch.zeros(2, 3)[0])  # a view, but not of a pool tensor
    del buf
    with torch.no_grad():
        again = reusable_empty(owner, "w", (2, 3), dtype=torch.float32, device="cpu")
    assert is_unshared_buffer(again)
    again.requires_grad_(True)
    assert not is_unshared_buffer(again)


def test_head_added_in_place_into_the_embeddings_buffer():
    """The embedding's hook runs first here: the head's per-sample gradient is added into the
    embedding's pooled buffer in place (no fresh tensor), with the oracle's values."""
    torch.manual_seed(4)
    model = _EmbeddingLast().double()
    gsm, twin = _wrap(model)
    x = _batch("embedding_last", 3, 5, 9)
    _loss(gsm(x)).backward()
    pooled = buffers._pools[model.wte]["weight"]
    assert model.wte.weight.grad_sample.data_ptr() == pooled.data_ptr()
    got = {n: p.grad_sample for n, p in model.named_parameters()}
    assert_grad_samples_close(got, _oracle(twin, x), atol=1e-10, rtol=1e-8)


class _TwoCallHead(nn.Module):
    """A bias-free head called twice (its calls are contracted together at the end)."""

    def __init__(self, bias=False):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 9, bias=bias)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x))) + self.head(x)


@pytest.mark.parametrize("kind", ["tied_lm", "gpt2", "two_call_head", "biased_head"])
def test_mean_reduction_scales_a_bias_free_heads_input(kind, monkeypatch):
    """Under ``loss_reduction="mean"`` the factor B goes to a bias-free head's (smaller) input
    rather than to its output gradient (not with a trainable bias, whose gradient does not see
    the input); the per-sample gradients are the oracle's."""
    from opacus.grad_sample import grad_sample_module as core

    torch.manual_seed(5)
    batch = 3
    if kind in ("two_call_head", "biased_head"):
        model = _TwoCallHead(bias=kind == "biased_head").double()
        x = torch.randn(batch, 5, 4, dtype=torch.float64)
    else:
        build, vocab = BUILDERS[kind]
        # T < dim < vocab: the head's input is its smallest operand (as in a real LM).
        model, x = build().double(), _batch(kind, batch, 2 if kind == "tied_lm" else 5, vocab)
    twin = copy.deepcopy(model)
    gsm = GradSampleModule(model, loss_reduction="mean")
    taken = []
    original = core._scale_input_instead

    def spy(*args):
        taken.append(original(*args))
        return taken[-1]

    monkeypatch.setattr(core, "_scale_input_instead", spy)
    (_loss(gsm(x)) / batch).backward()
    assert any(taken) == (kind != "biased_head")  # the head's input was scaled
    got = {n: p.grad_sample for n, p in model.named_parameters()}
    assert_grad_samples_close(got, _oracle(twin, x), atol=1e-10, rtol=1e-8)

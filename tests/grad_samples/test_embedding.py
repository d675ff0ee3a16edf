"""nn.Embedding / nn.EmbeddingBag per-sample gradients vs the brute-force oracle."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample.embedding import (
    compute_embedding_grad_sample,
    compute_embeddingbag_gradsampler,
)
from opacus.grad_sample.registry import GRAD_SAMPLERS
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples


def dot_loss(out, r):
    return (out * r).sum()


def by_name(layer, grads):
    names = {p: n for n, p in layer.named_parameters()}
    return {names[p]: g for p, g in grads.items()}


def test_registered():
    assert GRAD_SAMPLERS[nn.Embedding] is compute_embedding_grad_sample
    assert GRAD_SAMPLERS[nn.EmbeddingBag] is compute_embeddingbag_gradsampler


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    vocab=st.integers(1, 6),
    dim=st.integers(1, 4),
    padding=st.booleans(),
    scale_grad_by_freq=st.booleans(),
    data=st.data(),
)
def test_embedding_matches_oracle(batch, seq, vocab, dim, padding, scale_grad_by_freq, data):
    """A small vocabulary forces repeated indices within a sample."""
    torch.manual_seed(0)
    padding_idx = data.draw(st.integers(-vocab, vocab - 1)) if padding else None
    layer = nn.Embedding(
        vocab, dim, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq
    ).double()
    idx = torch.randint(0, vocab, (batch, *seq))
    r = torch.randn(batch, *seq, dim, dtype=torch.float64)
    expected = brute_force_grad_samples(layer, idx, loss_fn=dot_loss, targets=r)
    got = by_name(layer, compute_embedding_grad_sample(layer, [idx], r))
    assert_grad_samples_close(got, expected, atol=1e-12, rtol=1e-12)


def test_embedding_accepts_bare_index_tensor_and_frozen_weight():
    layer = nn.Embedding(5, 2)
    idx = torch.tensor([[1, 1, 4]])
    got = compute_embedding_grad_sample(layer, idx, torch.ones(1, 3, 2))
    torch.testing.assert_close(got[layer.weight][0, 1], torch.full((2,), 2.0))
    layer.weight.requires_grad_(False)
    assert compute_embedding_grad_sample(layer, [idx], torch.ones(1, 3, 2)) == {}


class Bags(nn.Module):
    """EmbeddingBag fed one padded row per sample, flattened to a 1-D input with offsets."""

    def __init__(self, bag: nn.EmbeddingBag):
        super().__init__()
        self.bag = bag

    def flat_inputs(self, padded, lengths, weights=None):
        mask = torch.arange(padded.shape[1]) < lengths.unsqueeze(1)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        if not self.bag.include_last_offset:
            offsets = offsets[:-1]
        args = [padded[mask], offsets]
        if weights is not None:
            args.append(weights[mask])
        return args

    def forward(self, padded, lengths, weights=None):
        return self.bag(*self.flat_inputs(padded, lengths, weights))


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    max_len=st.integers(1, 5),
    vocab=st.integers(2, 6),
    mode=st.sampled_from(["sum", "mean"]),
    padding=st.booleans(),
    include_last_offset=st.booleans(),
    weighted=st.booleans(),
    data=st.data(),
)
def test_embedding_bag_offsets(
    batch, max_len, vocab, mode, padding, include_last_offset, weighted, data
):
    """1-D input + offsets, one bag per sample, empty bags included."""
    torch.manual_seed(0)
    weighted = weighted and mode == "sum"  # PyTorch allows per_sample_weights with sum only.
    bag = nn.EmbeddingBag(
        vocab,
        3,
        mode=mode,
        padding_idx=data.draw(st.integers(0, vocab - 1)) if padding else None,
        include_last_offset=include_last_offset,
    ).double()
    model = Bags(bag)
    padded = torch.randint(0, vocab, (batch, max_len))
    lengths = torch.tensor(
        data.draw(st.lists(st.integers(0, max_len), min_size=batch, max_size=batch))
    )
    inputs = [padded, lengths]
    if weighted:
        inputs.append(torch.randn(batch, max_len, dtype=torch.float64))
    r = torch.randn(batch, 3, dtype=torch.float64)
    expected = brute_force_grad_samples(model, inputs, loss_fn=dot_loss, targets=r)
    got = compute_embeddingbag_gradsampler(bag, model.flat_inputs(*inputs), r)
    assert_grad_samples_close({"bag.weight": got[bag.weight]}, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_bag_2d_input(mode, padding_idx):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(5, 3, mode=mode, padding_idx=padding_idx).double()
    idx = torch.tensor([[2, 2, 1, 4], [0, 2, 2, 2], [3, 3, 3, 3]])
    r = torch.randn(3, 3, dtype=torch.float64)
    expected = brute_force_grad_samples(bag, idx, loss_fn=dot_loss, targets=r)
    got = by_name(bag, compute_embeddingbag_gradsampler(bag, [idx], r))
    assert_grad_samples_close(got, expected, atol=1e-12, rtol=1e-12)


def test_embedding_bag_2d_weighted():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(5, 3, mode="sum").double()
    idx = torch.tensor([[2, 2, 1], [0, 4, 4]])
    w = torch.randn(2, 3, dtype=torch.float64)
    r = torch.randn(2, 3, dtype=torch.float64)
    expected = brute_force_grad_samples(
        bag, (idx, None, w), loss_fn=dot_loss, targets=r, batch_dim=[0, None, 0]
    )
    got = by_name(bag, compute_embeddingbag_gradsampler(bag, [idx, None, w], r))
    assert_grad_samples_close(got, expected, atol=1e-12, rtol=1e-12)


def test_embedding_bag_errors():
    with pytest.raises(NotImplementedError, match="mode='max'"):
        compute_embeddingbag_gradsampler(
            nn.EmbeddingBag(4, 2, mode="max"),
            [torch.zeros(2, 2, dtype=torch.long)],
            torch.zeros(2, 2),
        )
    bag = nn.EmbeddingBag(4, 2)
    with pytest.raises(ValueError, match="offsets"):
        compute_embeddingbag_gradsampler(bag, [torch.zeros(3, dtype=torch.long)], torch.zeros(1, 2))
    with pytest.raises(ValueError, match="one bag per sample"):
        compute_embeddingbag_gradsampler(
            bag, [torch.zeros(3, dtype=torch.long), torch.tensor([0, 1])], torch.zeros(3, 2)
        )


class KeywordBags(Bags):
    """As ``Bags``, but passes ``offsets`` and ``per_sample_weights`` to the bag by keyword."""

    def forward(self, padded, lengths, weights):
        idx, offsets, w = self.flat_inputs(padded, lengths, weights)
        return self.bag(idx, offsets=offsets, per_sample_weights=w)


class KeywordWeights2d(nn.Module):
    def __init__(self, bag: nn.EmbeddingBag):
        super().__init__()
        self.bag = bag

    def forward(self, idx, weights):
        return self.bag(idx, per_sample_weights=weights)


def _keyword_case(two_d: bool):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(6, 3, mode="sum").double()
    if two_d:
        model = KeywordWeights2d(bag)
        inputs = [torch.randint(0, 6, (3, 4)), torch.randn(3, 4, dtype=torch.float64)]
    else:
        model = KeywordBags(bag)
        inputs = [
            torch.randint(0, 6, (3, 4)),
            torch.tensor([4, 2, 3]),
            torch.randn(3, 4, dtype=torch.float64),
        ]
    r = torch.randn(3, 3, dtype=torch.float64)
    return model, inputs, r


@pytest.mark.parametrize("two_d", [False, True])
@pytest.mark.parametrize("force_functorch", [False, True])
def test_embedding_bag_keyword_arguments_reach_the_grad_sampler(two_d, force_functorch):
    """``offsets=`` / ``per_sample_weights=`` passed by keyword were invisible to the capture
    hook (positional inputs only): the weights were dropped from the per-sample gradients."""
    from opacus.grad_sample import GradSampleModule

    model, inputs, r = _keyword_case(two_d)
    expected = brute_force_grad_samples(model, inputs, loss_fn=dot_loss, targets=r)
    gsm = GradSampleModule(model, loss_reduction="sum", force_functorch=force_functorch)
    dot_loss(gsm(*inputs), r).backward()
    got = {"bag.weight": model.bag.weight.grad_sample}
    assert_grad_samples_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("two_d", [False, True])
def test_embedding_bag_keyword_arguments_reach_the_ghost_norms(two_d):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model, inputs, r = _keyword_case(two_d)
    expected = brute_force_grad_samples(model, inputs, loss_fn=dot_loss, targets=r)["bag.weight"]
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=1.0)
    dot_loss(gsm(*inputs), r).backward()
    torch.testing.assert_close(gsm.get_norm_sample(), expected.flatten(1).norm(dim=1))


@pytest.mark.parametrize("ghost", [False, True])
def test_any_layer_input_passed_by_keyword_is_captured(ghost):
    """``layer(input=x)``: the capture hook sees positional inputs only; keyword inputs of every
    hooked layer are passed on positionally (this was an IndexError)."""
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, idx):
            return self.fc(input=self.emb(input=idx).mean(dim=1))

    torch.manual_seed(0)
    model = Keyword().double()
    idx = torch.randint(0, 6, (5, 3))
    r = torch.randn(5, 3, dtype=torch.float64)
    expected = brute_force_grad_samples(model, idx, loss_fn=dot_loss, targets=r)
    if ghost:
        gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=1.0)
        dot_loss(gsm(idx), r).backward()
        flat = torch.cat([g.flatten(1) for g in expected.values()], dim=1)
        torch.testing.assert_close(gsm.get_norm_sample(), flat.norm(dim=1))
    else:
        gsm = GradSampleModule(model, loss_reduction="sum")
        dot_loss(gsm(idx), r).backward()
        got = {n: p.grad_sample for n, p in model.named_parameters()}
        assert_grad_samples_close(got, expected, atol=1e-12, rtol=1e-12)

"""``opacus.utils.per_sample_gradients_utils`` against the brute-force oracle (``tests.oracle``)."""

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_sequence

from opacus.grad_sample import registry
from opacus.layers import DPLSTM
from opacus.utils import per_sample_gradients_utils as psg
from opacus.utils.packed_sequences import _gen_packed_data, packed_sequence_to_list
from opacus.utils.per_sample_gradients_utils import (
    ModelWithLoss,
    check_per_sample_gradients_are_correct,
    compute_grad_samples_microbatch_and_opacus,
)
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples

MODES = ["hooks", "functorch"]


def _linear(batch_first):
    return nn.Linear(5, 3), (torch.randn(4, 3, 5) if batch_first else torch.randn(3, 4, 5))


def _lstm(batch_first):
    x = torch.randn(4, 3, 5) if batch_first else torch.randn(3, 4, 5)
    return DPLSTM(5, 3, batch_first=batch_first), x


def _embedding(batch_first):
    shape = (4, 3) if batch_first else (3, 4)
    return nn.Embedding(10, 4), torch.randint(0, 10, shape)


def _conv(batch_first):
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 2)), torch.randn(4, 2, 6, 6)


CASES = {"linear": _linear, "lstm": _lstm, "embedding": _embedding, "conv": _conv}
LAYOUTS = [
    ("linear", True),
    ("linear", False),
    ("lstm", True),
    ("lstm", False),
    ("embedding", True),
    ("embedding", False),
    ("conv", True),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case,batch_first", LAYOUTS)
def test_check_is_true_for_supported_layers(case, batch_first, mode):
    torch.manual_seed(0)
    module, x = CASES[case](batch_first)
    assert check_per_sample_gradients_are_correct(
        x, module, batch_first=batch_first, grad_sample_mode=mode
    )


def _oracle_loss(reduction):
    def loss_fn(out):
        if isinstance(out, tuple):
            out = out[0]
        return out.abs().mean() if reduction == "mean" else out.abs().sum()

    return loss_fn


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case,batch_first", LAYOUTS)
def test_microbatch_and_opacus_match_the_oracle(case, batch_first, reduction, mode):
    torch.manual_seed(0)
    module, x = CASES[case](batch_first)
    micro, ours = compute_grad_samples_microbatch_and_opacus(
        x, module, batch_first=batch_first, loss_reduction=reduction, grad_sample_mode=mode
    )
    expected = brute_force_grad_samples(
        module, x, loss_fn=_oracle_loss(reduction), batch_dim=0 if batch_first else 1
    )
    assert_grad_samples_close(micro, expected)
    assert_grad_samples_close(ours, expected)


@pytest.mark.parametrize("sorted_", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_packed_sequences_match_the_oracle(sorted_, reduction):
    torch.manual_seed(0)
    module = DPLSTM(3, 2, batch_first=True)
    x = _gen_packed_data(5, 4, 3, True, sorted_=sorted_, generator=torch.Generator().manual_seed(1))
    sequences = packed_sequence_to_list(x)
    total_steps = sum(len(s) for s in sequences)
    # Oracle: each sequence alone as a (1, T_i, D) tensor; with "mean" the batch loss averages
    # over all time steps, so sample i's share (times B) is its mean loss * B * T_i / sum T.
    per_sample = []
    for s in sequences:
        scale = len(sequences) * len(s) / total_steps if reduction == "mean" else 1.0
        loss = _oracle_loss(reduction)
        per_sample.append(
            brute_force_grad_samples(module, s.unsqueeze(0), loss_fn=lambda o: scale * loss(o))
        )
    expected = {n: torch.cat([g[n] for g in per_sample]) for n in per_sample[0]}
    micro, ours = compute_grad_samples_microbatch_and_opacus(x, module, loss_reduction=reduction)
    assert_grad_samples_close(micro, expected)
    assert_grad_samples_close(ours, expected)
    assert check_per_sample_gradients_are_correct(x, module)


class _ScaledLinear(nn.Linear):
    """A layer class of its own, so that a sampler can be registered for it alone."""


@pytest.fixture
def broken_sampler():
    def wrong_sampler(layer, activations, backprops):
        a, g = activations[0], backprops
        out = {}
        if layer.weight.requires_grad:
            out[layer.weight] = 2 * torch.einsum("n...i,n...j->nij", g, a)  # off by 2x
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = torch.einsum("n...k->nk", g)
        return out

    previous = registry.GRAD_SAMPLERS.get(_ScaledLinear)
    registry.register_grad_sampler(_ScaledLinear)(wrong_sampler)
    yield
    if previous is None:
        del registry.GRAD_SAMPLERS[_ScaledLinear]
    else:
        registry.GRAD_SAMPLERS[_ScaledLinear] = previous


def test_check_is_false_for_a_broken_sampler(broken_sampler):
    torch.manual_seed(0)
    module = nn.Sequential(_ScaledLinear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(6, 5)
    assert not check_per_sample_gradients_are_correct(x, module, grad_sample_mode="hooks")
    # functorch differentiates the layer itself and never calls the registered sampler.
    assert check_per_sample_gradients_are_correct(x, module, grad_sample_mode="functorch")


def test_model_with_loss_is_an_l1_loss_against_zero():
    module = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    for reduction in ("mean", "sum"):
        expected = nn.L1Loss(reduction=reduction)(module(x), torch.zeros(4, 2))
        torch.testing.assert_close(ModelWithLoss(module, reduction)(x), expected)
    packed = pack_sequence([torch.randn(3, 5), torch.randn(2, 5)])
    lstm = DPLSTM(5, 2)
    out = lstm(packed)[0].data
    torch.testing.assert_close(ModelWithLoss(lstm, "sum")(packed), out.abs().sum())
    with pytest.raises(ValueError, match="loss_reduction"):
        ModelWithLoss(module, "none")


def test_small_helpers():
    assert psg.is_batch_empty(torch.zeros(0, 3))
    assert not psg.is_batch_empty(torch.zeros(2, 3))
    assert psg.is_batch_empty([torch.zeros(0), torch.zeros(2)])
    assert psg.is_batch_empty([])
    assert psg.get_grad_sample_modes() == ["hooks", "functorch"]
    assert psg.get_grad_sample_modes(use_ew=True)[:2] == ["hooks", "functorch"]
    assert isinstance(psg.check_torch_version_for_ew_sample(), bool)


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_is_a_runtime_error(mode):
    for fn in (check_per_sample_gradients_are_correct, compute_grad_samples_microbatch_and_opacus):
        with pytest.raises(RuntimeError, match=f"{fn.__name__}: x is an empty batch"):
            fn(torch.zeros(0, 5), nn.Linear(5, 2), grad_sample_mode=mode)
        with pytest.raises(RuntimeError, match="empty batch"):
            fn([torch.zeros(0, 5)], nn.Linear(5, 2), grad_sample_mode=mode)


def test_ew_needs_batch_first():
    x = torch.randn(3, 4, 5)
    for fn in (check_per_sample_gradients_are_correct, compute_grad_samples_microbatch_and_opacus):
        with pytest.raises(RuntimeError, match="'ew'.*batch_first=True"):
            fn(x, nn.Linear(5, 2), batch_first=False, grad_sample_mode="ew")


def test_differing_parameter_names_are_a_value_error(monkeypatch):
    real = psg.compute_opacus_grad_sample

    def renamed(*args, **kwargs):
        return {"other." + k: v for k, v in real(*args, **kwargs).items()}

    monkeypatch.setattr(psg, "compute_opacus_grad_sample", renamed)
    with pytest.raises(ValueError, match="parameter names differ"):
        compute_grad_samples_microbatch_and_opacus(torch.randn(3, 5), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="parameter names differ"):
        check_per_sample_gradients_are_correct(torch.randn(3, 5), nn.Linear(5, 2))


def test_model_with_loss_unpacks_tuples():
    bag = nn.EmbeddingBag(6, 3, mode="sum")
    index, offsets = torch.tensor([1, 2, 4, 5, 0]), torch.tensor([0, 2])
    for reduction in ("mean", "sum"):
        expected = nn.L1Loss(reduction=reduction)(bag(index, offsets), torch.zeros(2, 3))
        torch.testing.assert_close(ModelWithLoss(bag, reduction)((index, offsets)), expected)


def test_chunk_method_gets_the_whole_batch_first_batch():
    seen = []

    def chunks(batch):
        seen.append(batch)
        return iter(batch)

    x = torch.randn(3, 4, 5)  # (T, B, F)
    psg.compute_microbatch_grad_sample(x, nn.Linear(5, 2), batch_first=False, chunk_method=chunks)
    assert len(seen) == 1 and torch.equal(seen[0], x.transpose(0, 1))
    as_list = [torch.randn(5), torch.randn(5)]
    psg.compute_microbatch_grad_sample(as_list, nn.Linear(5, 2), chunk_method=chunks)
    assert seen[1] is as_list


def test_microbatch_is_deterministic_and_restores_the_flag():
    before = torch.are_deterministic_algorithms_enabled()
    flags = []

    class Probe(nn.Linear):
        def forward(self, x):
            flags.append(torch.are_deterministic_algorithms_enabled())
            return super().forward(x)

    torch.manual_seed(123)
    psg.compute_microbatch_grad_sample(torch.randn(2, 3), Probe(3, 1))
    assert flags == [True, True]
    assert torch.are_deterministic_algorithms_enabled() == before
    # torch is seeded 0 inside and nothing drew since: the next draw is seed 0's first.
    assert torch.equal(torch.randn(3), torch.randn(3, generator=torch.Generator().manual_seed(0)))


def _bag_oracle(bag, index, offsets, reduction):
    """Per-bag brute force: each bag alone through the layer, the loss of that bag alone."""
    bounds = offsets.tolist() + [index.shape[0]]
    rows = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        out = bag(index[start:end], torch.tensor([0]))
        loss = out.abs().mean() if reduction == "mean" else out.abs().sum()
        rows.append(torch.autograd.grad(loss, bag.weight)[0])
    return {"weight": torch.stack(rows)}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_tuple_inputs(mode, reduction):
    """(index, offsets) reaches the EmbeddingBag as two arguments; one row per bag."""
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(10, 4, mode=mode)
    index = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9])
    offsets = torch.tensor([0, 4, 6])

    def per_bag(batch):
        idx, offs = batch
        bounds = offs.tolist() + [idx.shape[0]]
        for start, end in zip(bounds[:-1], bounds[1:]):
            yield idx[start:end], torch.tensor([0])

    expected = _bag_oracle(bag, index, offsets, reduction)
    micro, ours = compute_grad_samples_microbatch_and_opacus(
        (index, offsets), bag, loss_reduction=reduction, chunk_method=per_bag
    )
    assert_grad_samples_close(micro, expected)
    assert_grad_samples_close(ours, expected)


def test_reexports_are_the_originals():
    from opacus.grad_sample.utils import wrap_model
    from opacus.utils import module_utils, packed_sequences

    assert psg.clone_module is module_utils.clone_module
    assert psg.trainable_parameters is module_utils.trainable_parameters
    assert psg.compute_seq_lengths is packed_sequences.compute_seq_lengths
    assert psg.unpack_packedsequences is packed_sequences.unpack_packedsequences
    gsm = psg.wrap_model(nn.Linear(2, 2), "hooks")
    assert type(gsm) is type(wrap_model(nn.Linear(2, 2), "hooks"))

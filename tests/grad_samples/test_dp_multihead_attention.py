"""Per-sample gradients of DPMultiheadAttention models vs the brute-force oracle, both layouts.

This is the regression suite of the DPMultiheadAttention fix: with ``batch_first=True`` the original
layer fed its inner projections sequence-first tensors, so the hooks (told ``batch_first=True``)
took the sequence for the batch.
"""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.dp_multihead_attention import compute_sequence_bias_grad_sample
from opacus.grad_sample.registry import GRAD_SAMPLERS, NORM_SAMPLERS
from opacus.layers import DPMultiheadAttention, SequenceBias
from opacus.validators import ModuleValidator
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples, grad_samples_of


def square_loss(out):
    return out.pow(2).sum()


class AttentionClassifier(nn.Module):
    """Cross-attention from ``query`` to ``memory`` (optionally padded), then a linear head."""

    def __init__(self, embed_dim, num_heads, batch_first, kdim=None, **kwargs):
        super().__init__()
        self.attn = DPMultiheadAttention(
            embed_dim, num_heads, batch_first=batch_first, kdim=kdim, vdim=kdim, **kwargs
        )
        self.head = nn.Linear(embed_dim, 3)

    def forward(self, query, memory, key_padding_mask=None):
        out, _ = self.attn(query, memory, memory, key_padding_mask=key_padding_mask)
        return self.head(out)


def check_against_oracle(model, inputs, batch_dims, batch_first, loss_reduction):
    batch = inputs[0].shape[batch_dims[0]]
    expected = brute_force_grad_samples(model, inputs, loss_fn=square_loss, batch_dim=batch_dims)
    gsm = GradSampleModule(model, batch_first=batch_first, loss_reduction=loss_reduction)
    loss = square_loss(gsm(*inputs))
    if loss_reduction == "mean":
        loss = loss / batch
    loss.backward()
    actual = grad_samples_of(gsm)
    for name, gs in actual.items():
        assert gs.shape[0] == batch, f"{name}: batch {gs.shape[0]} != {batch}"
    assert_grad_samples_close(actual, expected, atol=1e-9, rtol=1e-7)
    gsm.remove_hooks()


def make_inputs(N, L, S, E, kdim, batch_first, padded, gen):
    def seq(length, dim):
        return torch.randn(
            (N, length, dim) if batch_first else (length, N, dim),
            generator=gen,
            dtype=torch.float64,
        )

    query, memory = seq(L, E), seq(S, kdim or E)
    seq_dim = 0 if batch_first else 1
    inputs, dims = [query, memory], [seq_dim, seq_dim]
    if padded:
        mask = torch.rand(N, S, generator=gen) < 0.4
        mask[:, 0] = False
        inputs.append(mask)
        dims.append(0)
    return inputs, dims


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
@pytest.mark.parametrize("add_bias_kv", [False, True])
@pytest.mark.parametrize("add_zero_attn", [False, True])
def test_matches_brute_force(batch_first, loss_reduction, add_bias_kv, add_zero_attn):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    # N differs from L and S: a layer reading the wrong dimension cannot go unnoticed.
    N, L, S, E = 3, 4, 5, 6
    model = AttentionClassifier(
        E, 2, batch_first, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn
    ).double()
    inputs, dims = make_inputs(N, L, S, E, None, batch_first, padded=True, gen=gen)
    check_against_oracle(model, inputs, dims, batch_first, loss_reduction)


@settings(max_examples=15, deadline=None)
@given(
    N=st.integers(1, 4),
    L=st.integers(1, 4),
    S=st.integers(1, 4),
    num_heads=st.integers(1, 2),
    head_dim=st.integers(1, 3),
    kdim=st.sampled_from([None, 2]),
    batch_first=st.booleans(),
    loss_reduction=st.sampled_from(["sum", "mean"]),
    add_bias_kv=st.booleans(),
    add_zero_attn=st.booleans(),
    bias=st.booleans(),
    padded=st.booleans(),
)
def test_matches_brute_force_sweep(
    N,
    L,
    S,
    num_heads,
    head_dim,
    kdim,
    batch_first,
    loss_reduction,
    add_bias_kv,
    add_zero_attn,
    bias,
    padded,
):
    torch.manual_seed(N * 100 + L * 10 + S)
    gen = torch.Generator().manual_seed(7)
    E = num_heads * head_dim
    model = AttentionClassifier(
        E,
        num_heads,
        batch_first,
        kdim=kdim,
        bias=bias,
        add_bias_kv=add_bias_kv,
        add_zero_attn=add_zero_attn,
    ).double()
    inputs, dims = make_inputs(N, L, S, E, kdim, batch_first, padded, gen)
    check_against_oracle(model, inputs, dims, batch_first, loss_reduction)


def test_sequence_bias_sampler_registered_and_direct():
    assert GRAD_SAMPLERS[SequenceBias] is compute_sequence_bias_grad_sample
    layer = SequenceBias(4)
    backprops = torch.randn(3, 6, 4)  # batch first, as the hooks deliver it
    got = compute_sequence_bias_grad_sample(layer, [torch.randn(5, 3, 4)], backprops)
    torch.testing.assert_close(got[layer.bias], backprops[:, -1])
    norms = NORM_SAMPLERS[SequenceBias](layer, [torch.randn(5, 3, 4)], backprops)
    torch.testing.assert_close(norms[layer.bias], backprops[:, -1].norm(dim=-1))
    layer.bias.requires_grad_(False)
    assert compute_sequence_bias_grad_sample(layer, [None], backprops) == {}


# --------------------------------------------------------------------------------------------
# The old bug, reproduced on purpose, must be caught.


class OldLayoutDPMultiheadAttention(DPMultiheadAttention):
    """What Opacus did before the fix: with batch_first=True, transpose the inputs to
    sequence-first and feed *those* to the inner projections."""

    def forward(self, query, key, value, **kwargs):
        if not self.batch_first:
            return super().forward(query, key, value, **kwargs)
        self.batch_first = False
        try:
            out, weights = super().forward(
                query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), **kwargs
            )
        finally:
            self.batch_first = True
        return out.transpose(0, 1), weights


def old_layout_model(N, L):
    torch.manual_seed(0)
    model = AttentionClassifier(6, 2, batch_first=True).double()
    old = OldLayoutDPMultiheadAttention(6, 2, batch_first=True).double()
    old.load_state_dict(model.attn.state_dict())
    model.attn = old
    x = torch.randn(N, L, 6, dtype=torch.float64)
    return model, x


def test_old_layout_is_numerically_the_same_layer():
    """The reproduction changes only what the inner layers see, not the attention maths."""
    model, x = old_layout_model(3, 5)
    fixed = DPMultiheadAttention(6, 2, batch_first=True).double()
    fixed.load_state_dict(model.attn.state_dict())
    torch.testing.assert_close(model.attn(x, x, x)[0], fixed(x, x, x)[0])


def test_old_layout_mismatched_sizes_is_refused():
    """L != N: the projections' per-sample gradients would have L rows, the head's N."""
    model, x = old_layout_model(N=3, L=5)
    gsm = GradSampleModule(model, batch_first=True)
    with pytest.raises(ValueError, match="batch size"):
        gsm(x, x).sum().backward()


def test_old_layout_equal_sizes_mixes_samples():
    """L == N: shapes agree, so only the values betray the bug (privacy silently void)."""
    N = L = 4
    model, x = old_layout_model(N=N, L=L)
    expected = brute_force_grad_samples(model, [x, x], loss_fn=square_loss, batch_dim=[0, 0])
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    square_loss(gsm(x, x)).backward()
    actual = grad_samples_of(gsm)
    assert actual["attn.qlinear.weight"].shape == expected["attn.qlinear.weight"].shape
    for name in (
        "attn.qlinear.weight",
        "attn.klinear.weight",
        "attn.vlinear.weight",
        "attn.out_proj.weight",
    ):
        assert not torch.allclose(actual[name], expected[name], atol=1e-6), name
    # Summed over the batch it is still the true gradient: only the per-sample split is wrong.
    torch.testing.assert_close(
        actual["attn.qlinear.weight"].sum(0), expected["attn.qlinear.weight"].sum(0)
    )
    # The fixed layer on the same model and data gives the oracle's values.
    fixed_model, _ = old_layout_model(N=N, L=L)
    fresh = DPMultiheadAttention(6, 2, batch_first=True).double()
    fresh.load_state_dict(fixed_model.attn.state_dict())
    fixed_model.attn = fresh
    check_against_oracle(fixed_model, [x, x], [0, 0], True, "sum")


def oracle_norms(expected):
    return torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).norm(dim=0)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
def test_ghost_clipping_norms_match_brute_force(batch_first, loss_reduction):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    N, L, S, E = 3, 4, 5, 6
    model = AttentionClassifier(E, 2, batch_first, add_bias_kv=True).double()
    inputs, dims = make_inputs(N, L, S, E, None, batch_first, padded=True, gen=gen)
    expected = brute_force_grad_samples(model, inputs, loss_fn=square_loss, batch_dim=dims)
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=batch_first, loss_reduction=loss_reduction, max_grad_norm=1.0
    )
    loss = square_loss(gsm(*inputs))
    (loss / N if loss_reduction == "mean" else loss).backward()
    torch.testing.assert_close(gsm.get_norm_sample(), oracle_norms(expected))


@pytest.mark.parametrize("batch_first", [True, False])
def test_functorch_mode_matches_brute_force(batch_first):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = AttentionClassifier(6, 2, batch_first, add_bias_kv=True).double()
    inputs, dims = make_inputs(3, 4, 5, 6, None, batch_first, padded=False, gen=gen)
    expected = brute_force_grad_samples(model, inputs, loss_fn=square_loss, batch_dim=dims)
    gsm = GradSampleModule(
        model, batch_first=batch_first, loss_reduction="sum", force_functorch=True
    )
    square_loss(gsm(*inputs)).backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("batch_first", [True, False])
def test_fixed_transformer_encoder_layer_matches_brute_force(batch_first):
    """nn.TransformerEncoderLayer -> ModuleValidator.fix -> per-sample gradients, both layouts."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        8, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first
    )
    model = ModuleValidator.fix(layer).double()
    x = torch.randn((3, 5, 8) if batch_first else (5, 3, 8), dtype=torch.float64)
    check_against_oracle(model, [x], [0 if batch_first else 1], batch_first, "mean")

"""DPMultiheadAttention against the torch.nn.MultiheadAttention oracle (same weights)."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.layers import DPMultiheadAttention, SequenceBias

ATOL, RTOL = 1e-5, 1e-4


def make_pair(embed_dim, num_heads, seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(embed_dim, num_heads, **kwargs)
    dp = DPMultiheadAttention(embed_dim, num_heads, **kwargs)
    dp.load_state_dict(ref.state_dict())
    ref.eval()
    dp.eval()
    return ref, dp


def bool_mask(shape, gen):
    """Random boolean mask (True = masked) that never masks key 0, so no row is fully masked."""
    mask = torch.rand(shape, generator=gen) < 0.4
    mask[..., 0] = False
    return mask


def float_mask(shape, gen):
    mask = torch.randn(shape, generator=gen)
    mask[torch.rand(shape, generator=gen) < 0.3] = float("-inf")
    mask[..., 0] = 0.5
    return mask


def make_mask(kind, shape, gen):
    if kind is None:
        return None
    return bool_mask(shape, gen) if kind == "bool" else float_mask(shape, gen)


def assert_same(ref_out, dp_out):
    torch.testing.assert_close(dp_out[0], ref_out[0], atol=ATOL, rtol=RTOL)
    if ref_out[1] is None:
        assert dp_out[1] is None
    else:
        torch.testing.assert_close(dp_out[1], ref_out[1], atol=ATOL, rtol=RTOL)


@settings(max_examples=60, deadline=None)
@given(
    L=st.integers(1, 5),
    S=st.integers(1, 5),
    N=st.integers(1, 3),
    num_heads=st.integers(1, 3),
    head_dim=st.integers(1, 3),
    batch_first=st.booleans(),
    add_bias_kv=st.booleans(),
    add_zero_attn=st.booleans(),
    bias=st.booleans(),
    kv_dims=st.sampled_from([(None, None), (3, 5), (4, None)]),
    attn_kind=st.sampled_from([None, "bool", "float"]),
    attn_3d=st.booleans(),
    pad_kind=st.sampled_from([None, "bool", "float"]),
    need_weights=st.booleans(),
    average=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_torch(
    L,
    S,
    N,
    num_heads,
    head_dim,
    batch_first,
    add_bias_kv,
    add_zero_attn,
    bias,
    kv_dims,
    attn_kind,
    attn_3d,
    pad_kind,
    need_weights,
    average,
    seed,
):
    embed_dim = num_heads * head_dim
    kdim, vdim = kv_dims
    ref, dp = make_pair(
        embed_dim,
        num_heads,
        seed=seed,
        bias=bias,
        add_bias_kv=add_bias_kv,
        add_zero_attn=add_zero_attn,
        kdim=kdim,
        vdim=vdim,
        batch_first=batch_first,
    )
    gen = torch.Generator().manual_seed(seed)

    def seq(length, dim):
        shape = (N, length, dim) if batch_first else (length, N, dim)
        return torch.randn(shape, generator=gen)

    query, key, value = seq(L, embed_dim), seq(S, kdim or embed_dim), seq(S, vdim or embed_dim)
    attn_shape = (N * num_heads, L, S) if attn_3d else (L, S)
    attn_mask = make_mask(attn_kind, attn_shape, gen)
    key_padding_mask = make_mask(pad_kind, (N, S), gen)
    kwargs = dict(
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average,
    )
    assert_same(ref(query, key, value, **kwargs), dp(query, key, value, **kwargs))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("add_bias_kv", [False, True])
def test_is_causal_with_causal_mask(batch_first, need_weights, with_padding, add_bias_kv):
    ref, dp = make_pair(6, 2, batch_first=batch_first, add_bias_kv=add_bias_kv)
    L, N = 5, 3
    x = torch.randn((N, L, 6) if batch_first else (L, N, 6))
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[0, 3:] = True
    kwargs = dict(
        attn_mask=causal,
        is_causal=True,
        need_weights=need_weights,
        key_padding_mask=padding if with_padding else None,
    )
    assert_same(ref(x, x, x, **kwargs), dp(x, x, x, **kwargs))


def test_is_causal_without_mask_is_refused_like_torch():
    _, dp = make_pair(4, 2)
    x = torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        dp(x, x, x, is_causal=True)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("attn_3d", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_unbatched_inputs(batch_first, attn_3d, need_weights):
    ref, dp = make_pair(6, 3, batch_first=batch_first, add_bias_kv=True, kdim=4)
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(4, 6), torch.randn(5, 4), torch.randn(5, 6)
    attn_mask = bool_mask((3, 4, 5) if attn_3d else (4, 5), gen)
    padding = bool_mask((5,), gen)
    kwargs = dict(attn_mask=attn_mask, key_padding_mask=padding, need_weights=need_weights)
    out = dp(q, k, v, **kwargs)
    assert out[0].shape == (4, 6)
    assert_same(ref(q, k, v, **kwargs), out)


@pytest.mark.parametrize("batch_first", [False, True])
def test_dropout_in_eval_mode_and_average_weights_keyword(batch_first):
    ref, dp = make_pair(8, 2, dropout=0.5, batch_first=batch_first)
    x = torch.randn(3, 4, 8)
    for average in (True, False):
        assert_same(
            ref(x, x, x, average_attn_weights=average), dp(x, x, x, average_attn_weights=average)
        )
    # Opacus 1.6's positional order is kept: (..., attn_mask, is_causal); average_attn_weights,
    # which Opacus lacks, comes last (pass it by keyword as torch code does).
    assert dp(x, x, x, None, True, None, False, False)[1].shape == (
        (3, 2, 4, 4) if batch_first else (4, 2, 3, 3)
    )


def test_dropout_is_active_in_training_mode():
    _, dp = make_pair(8, 2, dropout=0.5)
    dp.train()
    x = torch.randn(5, 2, 8)
    torch.manual_seed(0)
    a = dp(x, x, x)[0]
    torch.manual_seed(1)
    b = dp(x, x, x)[0]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("add_bias_kv", [False, True])
def test_inner_layers_see_the_promised_layout(batch_first, add_bias_kv):
    """THE fix: every inner layer gets the batch on dim 0 (batch_first) or dim 1."""
    N, L, S, E = 2, 5, 7, 6
    dp = DPMultiheadAttention(E, 2, batch_first=batch_first, add_bias_kv=add_bias_kv, kdim=3)
    seen = {}
    for name in ("qlinear", "klinear", "vlinear", "out_proj", "seq_bias_k", "seq_bias_v"):
        layer = getattr(dp, name)
        if layer is not None:
            layer.register_forward_pre_hook(
                lambda m, args, name=name: seen.__setitem__(name, tuple(args[0].shape))
            )
    batch_dim = 0 if batch_first else 1

    def seq(length, dim):
        return torch.randn((N, length, dim) if batch_first else (length, N, dim))

    dp(seq(L, E), seq(S, 3), seq(S, E))
    assert set(seen) == {"qlinear", "klinear", "vlinear", "out_proj"} | (
        {"seq_bias_k", "seq_bias_v"} if add_bias_kv else set()
    )
    for name, shape in seen.items():
        assert shape[batch_dim] == N, f"{name} got {shape}: batch not on dim {batch_dim}"
        assert len(shape) == 3


@pytest.mark.parametrize("same_dims", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_from_torch_nested(same_dims, bias):
    """A checkpoint of a model with nn.MultiheadAttention loads into its DP version."""
    torch.manual_seed(0)
    dims = {} if same_dims else {"kdim": 3, "vdim": 5}
    ref = nn.Sequential(nn.MultiheadAttention(6, 2, bias=bias, add_bias_kv=True, **dims))
    dp = nn.Sequential(DPMultiheadAttention(6, 2, bias=bias, add_bias_kv=True, **dims))
    assert ("0.in_proj_weight" in ref.state_dict()) == same_dims
    dp.load_state_dict(ref.state_dict())
    q = torch.randn(4, 2, 6)
    k, v = torch.randn(3, 2, dims.get("kdim", 6)), torch.randn(3, 2, dims.get("vdim", 6))
    assert_same(ref[0](q, k, v), dp[0](q, k, v))
    # own keys round-trip
    other = DPMultiheadAttention(6, 2, bias=bias, add_bias_kv=True, **dims)
    other.load_state_dict(dp[0].state_dict())
    assert_same(dp[0](q, k, v), other(q, k, v))


def test_state_dict_mismatch_is_reported():
    ref = nn.MultiheadAttention(6, 2, add_bias_kv=True)
    dp = DPMultiheadAttention(6, 2)
    with pytest.raises(RuntimeError, match="seq_bias_k"):
        dp.load_state_dict(ref.state_dict())


def test_transformer_fast_path_attributes():
    dp = DPMultiheadAttention(4, 2, batch_first=True)
    assert dp._qkv_same_embed_dim is False and dp.in_proj_weight is None
    assert dp.in_proj_bias is None and dp.batch_first is True
    assert dp.unsqueeze_0_2(torch.zeros(3, 5)).shape == (1, 3, 1, 5)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda m: m(torch.randn(3, 2, 5), torch.randn(3, 2, 6), torch.randn(3, 2, 6)),
            "embed_dim",
        ),
        (lambda m: m(torch.randn(3, 2, 6), torch.randn(4, 3, 6), torch.randn(4, 3, 6)), "batch"),
        (
            lambda m: m(torch.randn(3, 2, 6), torch.randn(4, 2, 6), torch.randn(5, 2, 6)),
            "key and value",
        ),
        (lambda m: m(torch.randn(2, 6), torch.randn(4, 2, 6), torch.randn(4, 2, 6)), "dimensions"),
        (
            lambda m: m(*(torch.randn(3, 2, 6),) * 3, attn_mask=torch.zeros(3, 4)),
            r"attn_mask has shape",
        ),
        (
            lambda m: m(*(torch.randn(3, 2, 6),) * 3, attn_mask=torch.zeros(2, 3, 3)),
            r"\(N \* num_heads, L, S\)",
        ),
        (
            lambda m: m(*(torch.randn(3, 2, 6),) * 3, key_padding_mask=torch.zeros(3, 3)),
            r"key_padding_mask has shape",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(DPMultiheadAttention(6, 2))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DPMultiheadAttention(6, 4)


@pytest.mark.parametrize("batch_first", [False, True])
def test_sequence_bias(batch_first):
    layer = SequenceBias(4, batch_first=batch_first)
    x = torch.randn(3, 2, 4)
    y = layer(x)
    seq_dim, batch_dim = (1, 0) if batch_first else (0, 1)
    length, batch = x.shape[seq_dim], x.shape[batch_dim]
    assert y.shape[seq_dim] == length + 1 and y.shape[batch_dim] == batch
    torch.testing.assert_close(y.narrow(seq_dim, 0, length), x)
    last = y.narrow(seq_dim, length, 1).reshape(batch, 4)
    torch.testing.assert_close(last, layer.bias.detach().expand(batch, 4))
    with pytest.raises(ValueError, match="SequenceBias expects"):
        layer(torch.randn(3, 5))

"""DP layers save and load the state-dict format of the torch.nn layer they replace.

Oracle: the torch.nn layer itself (nn.RNN/GRU/LSTM, nn.MultiheadAttention): same keys, order,
shapes and values, and after loading either way the same outputs and gradients, compared key by
key through ``state_dict()``.
"""

import copy
import io

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_sequence

from opacus.grad_sample import GradSampleModule
from opacus.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention
from opacus.utils.module_utils import are_state_dict_equal
from opacus.validators import ModuleValidator

RNN_PAIRS = {"rnn": (nn.RNN, DPRNN), "gru": (nn.GRU, DPGRU), "lstm": (nn.LSTM, DPLSTM)}
ATOL, RTOL = 1e-5, 1e-4


def assert_same_state_dict(actual, expected):
    """Same keys in the same order, same shapes, same values."""
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
    assert are_state_dict_equal(actual, expected)


def load(direction, ref, dp):
    if direction == "torch_to_dp":
        dp.load_state_dict(ref.state_dict())
    else:
        ref.load_state_dict(dp.state_dict())  # strict: exactly torch's keys and shapes


def weighted_sum(tensors, gen):
    """A loss with random weights on every output entry, so every gradient path is exercised."""
    total = 0.0
    for t in tensors:
        if isinstance(t, PackedSequence):
            t = t.data
        total = total + (t * torch.randn(t.shape, generator=gen)).sum()
    return total


def flatten(out):
    y, h = out
    return [y, *h] if isinstance(h, tuple) else [y, h]


def grad_state_dict(module):
    """The module's gradients in its state-dict format (a copy whose parameters are the grads)."""
    holder = copy.deepcopy(module)
    grads = {n: p.grad for n, p in module.named_parameters()}
    with torch.no_grad():
        for name, p in holder.named_parameters():
            p.copy_(grads[name])
    return holder.state_dict()


def assert_same_grads(ref, dp):
    expected = {k: v.grad for k, v in ref.state_dict(keep_vars=True).items()}
    actual = grad_state_dict(dp)
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=ATOL, rtol=RTOL)


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(sorted(RNN_PAIRS)),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    bias=st.booleans(),
    batch_first=st.booleans(),
    proj=st.booleans(),
    packed=st.booleans(),
    direction=st.sampled_from(["torch_to_dp", "dp_to_torch"]),
    seed=st.integers(0, 2**16),
)
def test_rnn_state_dict_is_torchs(
    kind, num_layers, bidirectional, bias, batch_first, proj, packed, direction, seed
):
    torch.manual_seed(seed)
    kwargs = dict(
        num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
    )
    if kind == "lstm" and proj:
        kwargs["proj_size"] = 2
    ref_cls, dp_cls = RNN_PAIRS[kind]
    ref, dp = ref_cls(3, 4, **kwargs), dp_cls(3, 4, **kwargs)
    load(direction, ref, dp)
    assert_same_state_dict(dp.state_dict(), ref.state_dict())

    gen = torch.Generator().manual_seed(seed)
    if packed:
        lengths = torch.randint(1, 5, (3,), generator=gen).tolist()
        x = pack_sequence([torch.randn(n, 3, generator=gen) for n in lengths], False)
    else:
        x = torch.randn((2, 4, 3) if batch_first else (4, 2, 3), generator=gen)
    ref_out, dp_out = flatten(ref(x)), flatten(dp(x))
    for a, b in zip(ref_out, dp_out):
        a, b = (t.data if isinstance(t, PackedSequence) else t for t in (a, b))
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL)
    state = gen.get_state()
    weighted_sum(ref_out, gen).backward()
    gen.set_state(state)
    weighted_sum(dp_out, gen).backward()
    assert_same_grads(ref, dp)


@settings(max_examples=30, deadline=None)
@given(
    num_heads=st.integers(1, 3),
    head_dim=st.integers(1, 3),
    kv_dims=st.sampled_from([(None, None), (3, 5), (4, None)]),
    bias=st.booleans(),
    add_bias_kv=st.booleans(),
    add_zero_attn=st.booleans(),
    batch_first=st.booleans(),
    direction=st.sampled_from(["torch_to_dp", "dp_to_torch"]),
    seed=st.integers(0, 2**16),
)
def test_multihead_attention_state_dict_is_torchs(
    num_heads, head_dim, kv_dims, bias, add_bias_kv, add_zero_attn, batch_first, direction, seed
):
    torch.manual_seed(seed)
    embed_dim = num_heads * head_dim
    kdim, vdim = kv_dims
    kwargs = dict(
        bias=bias,
        add_bias_kv=add_bias_kv,
        add_zero_attn=add_zero_attn,
        kdim=kdim,
        vdim=vdim,
        batch_first=batch_first,
    )
    ref = nn.MultiheadAttention(embed_dim, num_heads, **kwargs)
    dp = DPMultiheadAttention(embed_dim, num_heads, **kwargs)
    load(direction, ref, dp)
    assert_same_state_dict(dp.state_dict(), ref.state_dict())

    gen = torch.Generator().manual_seed(seed)
    N, L, S = 2, 3, 4

    def seq(length, dim):
        return torch.randn((N, length, dim) if batch_first else (length, N, dim), generator=gen)

    q, k, v = seq(L, embed_dim), seq(S, kdim or embed_dim), seq(S, vdim or embed_dim)
    ref_out, dp_out = ref(q, k, v), dp(q, k, v)
    for a, b in zip(ref_out, dp_out):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL)
    state = gen.get_state()
    weighted_sum(ref_out, gen).backward()
    gen.set_state(state)
    weighted_sum(dp_out, gen).backward()
    assert_same_grads(ref, dp)


def test_multihead_attention_keys_and_shapes():
    dp = DPMultiheadAttention(6, 2, add_bias_kv=True)
    assert {k: tuple(v.shape) for k, v in dp.state_dict().items()} == {
        "in_proj_weight": (18, 6),
        "in_proj_bias": (18,),
        "bias_k": (1, 1, 6),
        "bias_v": (1, 1, 6),
        "out_proj.weight": (6, 6),
        "out_proj.bias": (6,),
    }
    dp = DPMultiheadAttention(6, 2, bias=False, kdim=3, vdim=4)
    assert {k: tuple(v.shape) for k, v in dp.state_dict().items()} == {
        "q_proj_weight": (6, 6),
        "k_proj_weight": (6, 3),
        "v_proj_weight": (6, 4),
        "out_proj.weight": (6, 6),
    }
    # The named parameters are the hookable projections (per-sample gradients need them).
    assert "qlinear.weight" in dict(dp.named_parameters())


def test_multihead_attention_loads_internal_format():
    torch.manual_seed(0)
    dp = DPMultiheadAttention(4, 2, add_bias_kv=True, kdim=3)
    other = DPMultiheadAttention(4, 2, add_bias_kv=True, kdim=3)
    other.load_state_dict({n: p.detach() for n, p in dp.named_parameters()})
    assert are_state_dict_equal(other.state_dict(), dp.state_dict())


def test_multihead_attention_wrong_shape_is_explained():
    dp = DPMultiheadAttention(4, 2)
    state = dp.state_dict()
    state["in_proj_weight"] = torch.zeros(8, 4)
    with pytest.raises(RuntimeError, match=r"DPMultiheadAttention: 'in_proj_weight' has shape"):
        dp.load_state_dict(state)
    state = nn.Sequential(DPMultiheadAttention(4, 2, add_bias_kv=True)).state_dict()
    state["0.bias_k"] = torch.zeros(1, 1, 3)
    with pytest.raises(RuntimeError, match=r"'0.bias_k' has shape \(1, 1, 3\)"):
        nn.Sequential(DPMultiheadAttention(4, 2, add_bias_kv=True)).load_state_dict(state)


class Net(nn.Module):
    """A model nesting attention and an LSTM, built from torch.nn or from the DP layers."""

    def __init__(self, dp: bool):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        attn, lstm = (DPMultiheadAttention, DPLSTM) if dp else (nn.MultiheadAttention, nn.LSTM)
        self.block = nn.ModuleDict(
            {"attn": attn(4, 2, add_bias_kv=True, batch_first=True), "norm": nn.LayerNorm(4)}
        )
        self.lstm = lstm(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        h = self.embed(x)
        h = self.block["norm"](h + self.block["attn"](h, h, h)[0])
        return self.head(self.lstm(h)[0][:, -1])


def test_nested_layers_use_torch_format_and_round_trip():
    torch.manual_seed(0)
    ref, dp = Net(dp=False).eval(), Net(dp=True).eval()
    dp.load_state_dict(ref.state_dict())
    assert_same_state_dict(dp.state_dict(), ref.state_dict())
    x = torch.randn(3, 5, 3)
    torch.testing.assert_close(dp(x), ref(x), atol=ATOL, rtol=RTOL)

    # a checkpoint of the DP model loads into a fresh copy (through torch.save) and into the
    # torch.nn model
    buffer = io.BytesIO()
    torch.save(dp.state_dict(), buffer)
    buffer.seek(0)
    fresh = Net(dp=True).eval()
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(x), ref(x), atol=ATOL, rtol=RTOL)
    back = Net(dp=False).eval()
    back.load_state_dict(dp.state_dict())
    torch.testing.assert_close(back(x), ref(x), atol=ATOL, rtol=RTOL)

    # the internal format loads at any depth
    internal = {n: p.detach() for n, p in dp.named_parameters()}
    assert "block.attn.qlinear.weight" in internal and "lstm.l1_reverse.ih.bias" in internal
    fresh = Net(dp=True).eval()
    fresh.load_state_dict(internal)
    torch.testing.assert_close(fresh(x), ref(x), atol=ATOL, rtol=RTOL)


def test_fixed_and_wrapped_models_keep_the_checkpoint_format():
    torch.manual_seed(0)
    ref = Net(dp=False)
    fixed = ModuleValidator.fix(ref)
    assert isinstance(fixed.block["attn"], DPMultiheadAttention)
    assert_same_state_dict(fixed.state_dict(), ref.state_dict())
    wrapped = GradSampleModule(fixed)
    other = GradSampleModule(Net(dp=True))
    other.load_state_dict(wrapped.state_dict())
    assert_same_state_dict(other.state_dict(), wrapped.state_dict())
    assert are_state_dict_equal(other._module.state_dict(), ref.state_dict())


@pytest.mark.parametrize("add_bias_kv", [False, True])
def test_mha_keep_vars_state_dict_carries_gradients(add_bias_kv):
    """Gradients compare key by key with nn.MultiheadAttention via state_dict(keep_vars=True)."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, add_bias_kv=add_bias_kv)
    dp = DPMultiheadAttention(8, 2, add_bias_kv=add_bias_kv)
    dp.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 8)
    ref(x, x, x)[0].pow(2).sum().backward()
    dp(x, x, x)[0].pow(2).sum().backward()
    ours, theirs = dp.state_dict(keep_vars=True), ref.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        assert value.is_leaf and value.grad is not None, key
        torch.testing.assert_close(value.grad, theirs[key].grad, atol=1e-5, rtol=1e-5)

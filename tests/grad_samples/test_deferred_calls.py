"""Layers called several times in one forward (RNN time steps, shared layers).

The hooks join such calls along a sequence dim and contract them once per backward; calls on a
shrinking batch (packed sequences) are zero-padded. Oracle: the batched graph itself, one
autograd pass per sample over the loss terms of that sample only (the layers never mix rows).
"""

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample import GradSampleModule
from opacus.layers.dp_rnn import RNNLinear
from tests.oracle import assert_grad_samples_close, grad_samples_of


class Shrinking(nn.Module):
    """``fc`` applied to the first ``b_k`` samples of ``(B, T_k, d)`` slices, call after call."""

    def __init__(self, layer: nn.Module, batches, seq_lens):
        super().__init__()
        self.fc = layer
        self.batches, self.seq_lens = batches, seq_lens

    def per_call_outputs(self, x):
        return [self.fc(x[:b, :t]) for b, t in zip(self.batches, self.seq_lens)]

    def forward(self, x):
        return torch.cat([y.sum(dim=1) for y in self.per_call_outputs(x)], dim=0)


def _expected(model: Shrinking, x: torch.Tensor):
    outs = model.per_call_outputs(x)
    params = dict(model.named_parameters())
    rows = []
    for i in range(max(y.shape[0] for y in outs)):
        loss_i = sum(y[i].sum(dim=0).pow(2).sum() for y in outs if y.shape[0] > i)
        rows.append(torch.autograd.grad(loss_i, list(params.values()), retain_graph=True))
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(params)}


@settings(max_examples=15, deadline=None)
@given(
    layer_cls=st.sampled_from([nn.Linear, RNNLinear]),
    bias=st.booleans(),
    calls=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 3)), min_size=2, max_size=5),
)
def test_repeated_calls_with_shrinking_batch_match_oracle(layer_cls, bias, calls):
    torch.manual_seed(0)
    batch = 5
    layer = layer_cls(3, 4, bias=bias)
    model = Shrinking(layer, [b for b, _ in calls], [t for _, t in calls])
    x = torch.randn(batch, 3, 3)
    expected = _expected(model, x)
    gsm = GradSampleModule(model, loss_reduction="sum")
    out = gsm(x)
    out.pow(2).sum().backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)


def test_repeated_full_batch_calls_are_summed_within_a_pass_and_kept_apart_across_passes():
    torch.manual_seed(1)
    model = Shrinking(nn.Linear(3, 2), [4, 4, 4], [2, 1, 3])
    x = torch.randn(4, 3, 3)
    expected = _expected(model, x)
    gsm = GradSampleModule(model, loss_reduction="sum")
    for _ in range(2):
        gsm(x).pow(2).sum().backward()
    chunks = grad_samples_of(gsm)
    assert all(isinstance(g, list) and len(g) == 2 for g in chunks.values())
    for k in range(2):
        assert_grad_samples_close({n: g[k] for n, g in chunks.items()}, expected)

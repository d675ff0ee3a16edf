"""Layer x layout x engine x reduction matrix against the brute-force oracle.

Every layer family with a grad sampler goes through ``GradSampleModule`` with its registered
sampler and with ``force_functorch=True`` (which also exercises the batch-mixing probe on it),
with both loss reductions; layers that can see a ``(T, B, ...)`` input also run with
``batch_first=False``; a few run through PyTorch's expanded weights (``"ew"``).
"""

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModule, wrap_model
from opacus.grad_sample.gsm_exp_weights import _call_for_per_sample_grads
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples, grad_samples_of

B = 3


def _randomised(model):
    # Norm layers start at weight 1 / bias 0; random values make a wrong formula visible.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _floats(*shape):
    return lambda: torch.randn(*shape)


def _ids(*shape):
    return lambda: torch.randint(0, 10, shape)


# name -> (model factory, input factory); the batch is dim 0 of the input.
BATCH_FIRST = {
    "layer_norm": (lambda: nn.LayerNorm(6), _floats(B, 3, 6)),
    "layer_norm_2d_shape": (lambda: nn.LayerNorm((3, 6)), _floats(B, 3, 6)),
    "group_norm": (lambda: nn.GroupNorm(2, 4), _floats(B, 4, 5)),
    "instance_norm1d": (lambda: nn.InstanceNorm1d(4, affine=True), _floats(B, 4, 5)),
    "instance_norm2d": (lambda: nn.InstanceNorm2d(3, affine=True), _floats(B, 3, 4, 4)),
    "instance_norm3d": (lambda: nn.InstanceNorm3d(2, affine=True), _floats(B, 2, 3, 3, 3)),
    "rms_norm": (lambda: nn.RMSNorm(6), _floats(B, 3, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1, dilation=1), _floats(B, 3, 7)),
    "conv2d": (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2), _floats(B, 2, 6, 5)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 4), nn.Tanh()), _ids(B, 5)),
    "embedding_bag": (lambda: nn.EmbeddingBag(10, 4, mode="mean"), _ids(B, 5)),
}

# name -> (model factory, input factory); the batch is dim 1 of the input (T, B, ...).
# Conv, GroupNorm, InstanceNorm and EmbeddingBag read their batch from dim 0 by definition, so a
# time-major layout does not apply to them.
TIME_MAJOR = {
    "embedding": (lambda: nn.Embedding(10, 4), _ids(5, B)),
    "layer_norm": (lambda: nn.LayerNorm(6), _floats(4, B, 6)),
    "rms_norm": (lambda: nn.RMSNorm(6), _floats(4, B, 6)),
    "embedding_norms_linear": (
        lambda: nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6), nn.RMSNorm(6), nn.Linear(6, 2)),
        _ids(5, B),
    ),
}


def _check(make_model, make_input, *, batch_first, force_functorch, reduction):
    torch.manual_seed(0)
    model = _randomised(make_model())
    x = make_input()
    batch_dim = 0 if batch_first else 1
    expected = brute_force_grad_samples(model, x, batch_dim=batch_dim)
    gsm = GradSampleModule(
        model, batch_first=batch_first, loss_reduction=reduction, force_functorch=force_functorch
    )
    out = gsm(x)
    (out.sum() / x.shape[batch_dim] if reduction == "mean" else out.sum()).backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("force_functorch", [False, True])
@pytest.mark.parametrize("name", sorted(BATCH_FIRST))
def test_batch_first(name, force_functorch, reduction):
    make_model, make_input = BATCH_FIRST[name]
    _check(
        make_model,
        make_input,
        batch_first=True,
        force_functorch=force_functorch,
        reduction=reduction,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("force_functorch", [False, True])
@pytest.mark.parametrize("name", sorted(TIME_MAJOR))
def test_time_major(name, force_functorch, reduction):
    make_model, make_input = TIME_MAJOR[name]
    _check(
        make_model,
        make_input,
        batch_first=False,
        force_functorch=force_functorch,
        reduction=reduction,
    )


class _Permuting(nn.Module):
    """Sees (T, B, C), runs a per-position Linear and LayerNorm, returns (B, T, C) permuted back."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.proj(x)).permute(1, 0, 2)


@pytest.mark.parametrize("force_functorch", [False, True])
def test_time_major_model_that_permutes_its_output(force_functorch):
    torch.manual_seed(0)
    model = _randomised(_Permuting())
    x = torch.randn(5, B, 4)
    expected = brute_force_grad_samples(model, x, batch_dim=1)
    gsm = GradSampleModule(model, batch_first=False, force_functorch=force_functorch)
    gsm(x).sum().div(B).backward()
    assert_grad_samples_close(grad_samples_of(gsm), expected)


# ----------------------------------------------------------------------------- expanded weights
EW_MODELS = {
    "conv2d": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2)),
        _floats(B, 2, 5, 5),
    ),
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), _ids(B, 5)),
    "layer_norm": (lambda: nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)), _floats(B, 3, 6)),
    "group_norm": (lambda: nn.Sequential(nn.Conv1d(4, 4, 1), nn.GroupNorm(2, 4)), _floats(B, 4, 5)),
    "rms_norm": (lambda: nn.RMSNorm(6), _floats(B, 3, 6)),
}


@pytest.mark.skipif(
    _call_for_per_sample_grads() is None,
    reason="this torch has no torch.nn.utils._per_sample_grad.call_for_per_sample_grads",
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(EW_MODELS))
def test_expanded_weights(name, reduction):
    if name == "rms_norm":
        pytest.skip("torch's expanded weights have no rule for rms_norm (it raises on the forward)")
    make_model, make_input = EW_MODELS[name]
    torch.manual_seed(0)
    model = _randomised(make_model())
    x = make_input()
    expected = brute_force_grad_samples(model, x)
    ew = wrap_model(model, grad_sample_mode="ew", loss_reduction=reduction)
    out = ew(x)
    (out.sum() / B if reduction == "mean" else out.sum()).backward()
    assert_grad_samples_close(grad_samples_of(ew), expected)

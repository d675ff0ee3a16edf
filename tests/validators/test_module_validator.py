"""ModuleValidator: what it reports, what it fixes, and that fixed models compute the same thing."""

import pytest
import torch
import torch.nn as nn

from opacus.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention
from opacus.utils.module_utils import are_state_dict_equal
from opacus.validators import ModuleValidator, register_module_fixer, register_module_validator
from opacus.validators.errors import (
    IllegalModuleConfigurationError,
    NotYetSupportedModuleError,
    ShouldReplaceModuleError,
    UnsupportableModuleError,
    UnsupportedError,
    UnsupportedModuleError,
)


def test_error_hierarchy():
    assert issubclass(UnsupportedError, ValueError)
    for cls in (
        NotYetSupportedModuleError,
        ShouldReplaceModuleError,
        UnsupportableModuleError,
        IllegalModuleConfigurationError,
    ):
        assert issubclass(cls, UnsupportedModuleError)


def test_valid_model_has_no_errors():
    model = nn.Sequential(
        nn.Linear(3, 4),
        nn.LayerNorm(4),
        DPLSTM(4, 4),
        DPMultiheadAttention(4, 2),
        nn.InstanceNorm1d(4),
    )
    assert ModuleValidator.validate(model) == []
    assert ModuleValidator.is_valid(model)


@pytest.mark.parametrize(
    "module, error, remedy",
    [
        (nn.BatchNorm1d(4), ShouldReplaceModuleError, "GroupNorm"),
        (nn.BatchNorm2d(4), ShouldReplaceModuleError, "GroupNorm"),
        (nn.BatchNorm3d(4), ShouldReplaceModuleError, "GroupNorm"),
        (nn.SyncBatchNorm(4), ShouldReplaceModuleError, "GroupNorm"),
        (nn.LSTM(3, 4), ShouldReplaceModuleError, "DPLSTM"),
        (nn.GRU(3, 4), ShouldReplaceModuleError, "DPGRU"),
        (nn.RNN(3, 4), ShouldReplaceModuleError, "DPRNN"),
        (nn.MultiheadAttention(4, 2), ShouldReplaceModuleError, "DPMultiheadAttention"),
        (
            nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
            IllegalModuleConfigurationError,
            "track_running_stats=False",
        ),
    ],
)
def test_reports_submodule_path_and_remedy(module, error, remedy):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Identity(), module))
    errors = ModuleValidator.validate(model)
    assert len(errors) == 1
    assert isinstance(errors[0], error)
    message = str(errors[0])
    assert "'1.1'" in message and type(module).__name__ in message and remedy in message
    assert not ModuleValidator.is_valid(model)
    with pytest.raises(error, match=remedy):
        ModuleValidator.validate(model, strict=True)


def test_strict_combines_several_errors():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.LSTM(3, 3))
    with pytest.raises(UnsupportedModuleError, match=r"(?s)'0'.*'1'"):
        ModuleValidator.validate(model, strict=True)


class ScaleWithBuffer(nn.Module):
    """A custom trainable layer that owns a buffer and has no grad sampler."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        return x * self.scale


class RootWithOwnParameter(nn.Module):
    """A parameter on a non-leaf module (e.g. a ViT class token): the fallback handles it."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(3))
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        return self.inner(x + self.token)


def test_trainable_params_outside_supported_modules_are_reported():
    model = nn.Sequential(ScaleWithBuffer())
    errors = ModuleValidator.validate(model)
    assert len(errors) == 1 and isinstance(errors[0], NotYetSupportedModuleError)
    assert "'0'" in str(errors[0]) and "scale" in str(errors[0]) and "calls" in str(errors[0])
    model[0].scale.requires_grad_(False)  # frozen: nothing to compute
    assert ModuleValidator.is_valid(model)
    assert ModuleValidator.is_valid(RootWithOwnParameter())


def test_validator_agrees_with_grad_sample_module():
    """What the validator accepts, the hooks can handle, and vice versa (strict construction)."""
    from opacus.grad_sample import GradSampleModule

    for model in (RootWithOwnParameter(), nn.Sequential(nn.Linear(3, 3), DPLSTM(3, 3))):
        assert ModuleValidator.is_valid(model)
        GradSampleModule(model, strict=True)
    model = nn.Sequential(ScaleWithBuffer())
    assert not ModuleValidator.is_valid(model)
    with pytest.raises(NotImplementedError):
        GradSampleModule(model, strict=True)


def test_fix_returns_a_copy_and_leaves_input_alone():
    model = nn.Sequential(nn.Conv2d(3, 48, 1), nn.BatchNorm2d(48), nn.LSTM(2, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = ModuleValidator.fix(model)
    assert fixed is not model
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[2], nn.LSTM)
    assert are_state_dict_equal(before, model.state_dict())
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_groups == 16
    assert isinstance(fixed[2], DPLSTM)
    assert ModuleValidator.is_valid(fixed)
    assert fixed[0].weight is not model[0].weight
    torch.testing.assert_close(fixed[0].weight, model[0].weight)


@pytest.mark.parametrize("channels, groups", [(4, 4), (32, 32), (64, 32), (48, 16), (3, 1)])
def test_batchnorm_to_groupnorm(channels, groups):
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    bn.bias.requires_grad_(False)
    gn = ModuleValidator.fix(bn)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == groups and channels % groups == 0
    torch.testing.assert_close(gn.weight, bn.weight)
    torch.testing.assert_close(gn.bias, bn.bias)
    assert not gn.bias.requires_grad
    # Per sample: GroupNorm's output for a sample does not depend on the rest of the batch.
    x = torch.randn(4, channels, 3, 3)
    torch.testing.assert_close(gn(x)[:1], gn(x[:1]))


@pytest.mark.parametrize(
    "bn, expected",
    [
        (nn.BatchNorm1d(4), nn.InstanceNorm1d),
        (nn.BatchNorm2d(4), nn.InstanceNorm2d),
        (nn.BatchNorm3d(4), nn.InstanceNorm3d),
    ],
)
def test_batchnorm_to_instance_norm_on_request(bn, expected):
    fixed = ModuleValidator.fix(nn.Sequential(bn), replace_bn_with_in=True)[0]
    assert type(fixed) is expected and fixed.num_features == 4
    assert not fixed.track_running_stats
    assert ModuleValidator.is_valid(fixed)


def test_instance_norm_fix():
    norm = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    fixed = ModuleValidator.fix(norm)
    assert norm.track_running_stats and not fixed.track_running_stats
    assert fixed.running_mean is None
    x = torch.randn(2, 3, 4, 4)
    norm.train()
    torch.testing.assert_close(fixed(x), norm(x))  # training mode: both use instance statistics
    assert ModuleValidator.is_valid(fixed)


@pytest.mark.parametrize(
    "ref, dp_type, x",
    [
        (
            nn.LSTM(3, 5, 2, bidirectional=True, batch_first=True, proj_size=2),
            DPLSTM,
            torch.randn(2, 4, 3),
        ),
        (nn.GRU(3, 5, bias=False), DPGRU, torch.randn(4, 2, 3)),
        (nn.RNN(3, 5, nonlinearity="relu", dropout=0.2, num_layers=2), DPRNN, torch.randn(4, 2, 3)),
    ],
)
def test_rnn_fix_is_equivalent(ref, dp_type, x):
    ref.eval()
    fixed = ModuleValidator.fix(ref)
    assert type(fixed) is dp_type and not fixed.training
    assert fixed.batch_first == ref.batch_first and fixed.bidirectional == ref.bidirectional
    out_ref, out_dp = ref(x), fixed(x)
    torch.testing.assert_close(out_dp[0], out_ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_dp[1], out_ref[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(
    "options",
    [{}, {"bias": False}, {"add_bias_kv": True, "add_zero_attn": True}, {"kdim": 3, "vdim": 5}],
)
def test_multihead_attention_fix_is_equivalent(batch_first, options):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(6, 3, dropout=0.1, batch_first=batch_first, **options).eval()
    fixed = ModuleValidator.fix(ref)
    assert isinstance(fixed, DPMultiheadAttention)
    assert fixed.batch_first == batch_first and not fixed.training
    assert (fixed.kdim, fixed.vdim, fixed.num_heads) == (ref.kdim, ref.vdim, 3)
    q = torch.randn(2, 4, 6)
    k, v = torch.randn(2, 4, ref.kdim), torch.randn(2, 4, ref.vdim)
    for a, b in zip(ref(q, k, v), fixed(q, k, v)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_fix_keeps_frozen_parameters_frozen():
    ref = nn.MultiheadAttention(4, 2, add_bias_kv=True)
    ref.in_proj_weight.requires_grad_(False)
    ref.bias_v.requires_grad_(False)
    fixed = ModuleValidator.fix(ref)
    frozen = {n for n, p in fixed.named_parameters() if not p.requires_grad}
    assert frozen == {"qlinear.weight", "klinear.weight", "vlinear.weight", "seq_bias_v.bias"}
    lstm = nn.LSTM(2, 3)
    lstm.weight_hh_l0.requires_grad_(False)
    fixed = ModuleValidator.fix(lstm)
    assert not fixed.l0.hh.weight.requires_grad and fixed.l0.ih.weight.requires_grad


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("use_masks", [False, True])
def test_fixed_transformer_encoder_layer_is_equivalent(batch_first, norm_first, use_masks):
    """nn.TransformerEncoderLayer calls self_attn with keywords and checks fast-path attributes."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        8, 2, dim_feedforward=16, batch_first=batch_first, norm_first=norm_first
    )
    fixed = ModuleValidator.fix_and_validate(layer).eval()  # validation needs training mode
    layer.eval()
    assert isinstance(fixed.self_attn, DPMultiheadAttention)
    N, L = 3, 5
    x = torch.randn((N, L, 8) if batch_first else (L, N, 8))
    kwargs = {}
    if use_masks:
        padding = torch.zeros(N, L, dtype=torch.bool)
        padding[0, 3:] = True
        kwargs = dict(
            src_mask=nn.Transformer.generate_square_subsequent_mask(L),
            is_causal=True,
            src_key_padding_mask=padding.float().masked_fill(padding, float("-inf")),
        )
    with torch.no_grad():  # no-grad eval is where torch's fused fast path would kick in
        expected = layer(x, **kwargs)
        actual = fixed(x, **kwargs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fixed(x, **kwargs), expected, atol=1e-5, rtol=1e-4)


def test_fixed_transformer_encoder_stack_loads_original_checkpoint():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True),
        2,
        enable_nested_tensor=False,
    ).eval()
    fixed = ModuleValidator.fix(encoder)
    other = ModuleValidator.fix(
        nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, enable_nested_tensor=False
        )
    ).eval()
    other.load_state_dict(encoder.state_dict())  # nn.MultiheadAttention keys, nested
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), encoder(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(other(x), encoder(x), atol=1e-5, rtol=1e-4)


def test_fixed_encoder_with_nested_tensor_fast_path_is_equivalent():
    """The encoder decided use_nested_tensor=True for nn.MultiheadAttention; fix turns it off."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
    encoder.eval()
    assert encoder.use_nested_tensor
    fixed = ModuleValidator.fix(encoder)
    assert not fixed.use_nested_tensor and ModuleValidator.is_valid(fixed.train())
    fixed.eval()
    x = torch.randn(3, 5, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=padding)
        actual = fixed(x, src_key_padding_mask=padding)
    # torch's nested path zeroes padded positions; only real positions carry meaning.
    torch.testing.assert_close(actual[~padding], expected[~padding], atol=1e-5, rtol=1e-4)
    fixed.use_nested_tensor = True
    errors = ModuleValidator.validate(fixed.train())
    assert len(errors) == 1 and isinstance(errors[0], IllegalModuleConfigurationError)
    assert "use_nested_tensor" in str(errors[0])


def test_nested_tensor_input_is_refused_clearly():
    attn = DPMultiheadAttention(4, 2, batch_first=True)
    nested = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)])
    with pytest.raises(ValueError, match="use_nested_tensor=False"):
        attn(nested, nested, nested)


@pytest.mark.parametrize("batch_first", [False, True])
def test_fixed_full_transformer_is_equivalent(batch_first):
    torch.manual_seed(0)
    model = nn.Transformer(
        8,
        2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=16,
        batch_first=batch_first,
    )
    fixed = ModuleValidator.fix_and_validate(model).eval()
    model.eval()
    assert not any(isinstance(m, nn.MultiheadAttention) for m in fixed.modules())
    shape = (2, 5, 8) if batch_first else (5, 2, 8)
    src, tgt = torch.randn(shape), torch.randn(shape)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        expected = model(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True)
        actual = fixed(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_fix_and_validate_raises_on_unfixable():
    model = nn.Sequential(nn.BatchNorm1d(3), ScaleWithBuffer())
    with pytest.raises(NotYetSupportedModuleError, match="'1'"):
        ModuleValidator.fix_and_validate(model)


def test_shared_module_stays_shared_after_fix():
    bn = nn.BatchNorm1d(3)
    fixed = ModuleValidator.fix(nn.Sequential(bn, nn.ReLU(), bn))
    assert fixed[0] is fixed[2] and isinstance(fixed[0], nn.GroupNorm)


def test_custom_validator_and_fixer_registration():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

    class Replacement(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

    @register_module_validator(Custom)
    def _validate(module):
        return [UnsupportableModuleError("custom says no")]

    @register_module_fixer(Custom)
    def _fix(module, tag="default"):
        return Replacement(tag)

    try:
        model = nn.Sequential(Custom())
        assert "custom says no" in str(ModuleValidator.validate(model)[0])
        assert ModuleValidator.fix(model, tag="x")[0].tag == "x"  # kwargs reach the fixer
        assert ModuleValidator.fix(model, unrelated=1)[0].tag == "default"
    finally:
        del ModuleValidator.VALIDATORS[Custom]
        del ModuleValidator.FIXERS[Custom]

"""ModuleValidator.validate / is_valid / fix and the BatchNorm fixer: the Opacus 1.6 contract.

Oracles: the contract's exact examples (group counts, error types, log lines), torch.nn's own
GroupNorm/InstanceNorm maths (``F.group_norm``) for what a fixed model computes.
"""

import logging
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from opacus.layers import DPGRU, DPLSTM, DPMultiheadAttention
from opacus.validators import ModuleValidator
from opacus.validators import batch_norm as bn_fixer
from opacus.validators import register_module_fixer
from opacus.validators.errors import (
    IllegalModuleConfigurationError,
    ShouldReplaceModuleError,
    UnsupportableModuleError,
    UnsupportedModuleError,
)

BN_LINE = "The default batch_norm fixer replaces BatchNorm with GroupNorm."
SWAP = re.compile(r"Replaced sub_module .+ with .*", re.DOTALL)


def conv_bn(c_in, c_out, groups=1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    )


class TinyMobileNet(nn.Module):
    """MobileNetV2-like: stem, an inverted residual block (expand, depthwise, project), head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16),
            nn.Sequential(
                conv_bn(16, 48),
                conv_bn(48, 48, groups=48),
                nn.Conv2d(48, 16, 1, bias=False),
                nn.BatchNorm2d(16),
            ),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class RecordAll(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def root_records():
    """Every record at INFO or above from any logger, captured through the root logger.

    The root logger keeps its default WARNING level: the validators' INFO records must still
    come through (their loggers are at INFO and propagate).
    """
    handler = RecordAll()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


# ---------------------------------------------------------------- validate / is_valid


def test_fixed_mobilenet_is_invalid_in_eval_and_valid_in_train():
    model = ModuleValidator.fix(TinyMobileNet())
    assert ModuleValidator.is_valid(model)
    model.eval()
    errors = ModuleValidator.validate(model)
    assert len(errors) == 1 and isinstance(errors[0], IllegalModuleConfigurationError)
    assert "training mode" in str(errors[0]) and "train()" in str(errors[0])
    assert not ModuleValidator.is_valid(model)
    with pytest.raises(IllegalModuleConfigurationError, match="training mode"):
        ModuleValidator.validate(model, strict=True)
    model.train()
    assert ModuleValidator.is_valid(model) and ModuleValidator.validate(model) == []


def test_training_mode_error_comes_first():
    model = nn.Sequential(nn.LSTM(2, 2), nn.BatchNorm1d(2)).eval()
    errors = ModuleValidator.validate(model)
    assert [type(e) for e in errors] == [
        IllegalModuleConfigurationError,
        ShouldReplaceModuleError,
        ShouldReplaceModuleError,
    ]
    # Only the root's mode matters: a submodule in eval mode is fine.
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).eval())
    assert ModuleValidator.is_valid(model)


def test_non_learnable_batch_norm_is_not_reported():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, affine=False)
    )
    errors = ModuleValidator.validate(model)
    assert len(errors) == 1 and "'1'" in str(errors[0])
    assert not ModuleValidator.is_valid(model)
    model[1].weight.requires_grad_(False)
    assert not ModuleValidator.is_valid(model)  # the bias still trains
    model[1].bias.requires_grad_(False)
    assert ModuleValidator.is_valid(model) and ModuleValidator.validate(model) == []


def test_non_learnable_batch_norm_in_training_mode_is_warned_about(root_records):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8, affine=False))
    assert ModuleValidator.is_valid(model)
    (record,) = root_records
    assert record.levelno == logging.WARNING and "'1' (BatchNorm2d)" in record.getMessage()
    assert "GradSampleModule" in record.getMessage()
    root_records.clear()
    model[1].eval()  # fixed running statistics: no samples mixed, nothing learnt from them
    assert ModuleValidator.is_valid(model) and root_records == []
    model[1].track_running_stats = False  # batch statistics even in eval mode
    assert ModuleValidator.is_valid(model) and len(root_records) == 1


def test_non_learnable_instance_norm_with_running_stats_is_warned_about(root_records):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.InstanceNorm2d(8, track_running_stats=True))
    assert ModuleValidator.is_valid(model)  # as Opacus 1.6: nothing in it trains
    (record,) = root_records
    assert record.levelno == logging.WARNING and "track_running_stats=False" in record.getMessage()
    root_records.clear()
    model[1] = nn.InstanceNorm2d(8)
    assert ModuleValidator.is_valid(model) and root_records == []


def test_frozen_unsupported_layers_are_not_reported():
    model = nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 3).requires_grad_(False))
    assert ModuleValidator.is_valid(model)
    model[1].weight_hh_l0.requires_grad_(True)
    assert not ModuleValidator.is_valid(model)


def test_strict_raises_unsupported_module_error():
    for model in (nn.Sequential(nn.BatchNorm1d(3)), nn.Sequential(nn.BatchNorm1d(3), nn.GRU(3, 3))):
        with pytest.raises(UnsupportedModuleError):
            ModuleValidator.validate(model, strict=True)
    assert ModuleValidator.validate(nn.Linear(2, 2), strict=True) == []


# ---------------------------------------------------------------- fix and its logging


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.frozen_bn = nn.BatchNorm2d(16, affine=False)
        self.rnn = nn.Sequential(nn.LSTM(4, 4), nn.GRU(4, 4))
        self.attn = nn.MultiheadAttention(4, 2)


def test_fix_logs_each_swap_and_nothing_else(root_records):
    model = Mixed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Python warnings either
        fixed = ModuleValidator.fix(model)
    messages = [r.getMessage() for r in root_records]
    assert messages, "fix() logged nothing"
    for message in messages:
        assert SWAP.match(message) or BN_LINE in message, message
    assert all(r.levelno == logging.INFO for r in root_records)
    swaps = [m for m in messages if m.startswith("Replaced")]
    expected = {
        "bn": (model.bn, fixed.bn),
        "rnn.0": (model.rnn[0], fixed.rnn[0]),
        "rnn.1": (model.rnn[1], fixed.rnn[1]),
        "attn": (model.attn, fixed.attn),
    }
    assert sorted(swaps) == sorted(
        f"Replaced sub_module {name} : {old} with {new}" for name, (old, new) in expected.items()
    )
    assert sum(BN_LINE in m for m in messages) == 1  # the frozen BatchNorm is left alone
    assert {r.name for r in root_records} == {
        "opacus.validators.module_validator",
        "opacus.validators.batch_norm",
    }
    assert isinstance(fixed.bn, nn.GroupNorm) and fixed.bn.num_groups == 16
    assert type(fixed.frozen_bn) is nn.BatchNorm2d
    assert isinstance(fixed.rnn[0], DPLSTM) and isinstance(fixed.rnn[1], DPGRU)
    assert isinstance(fixed.attn, DPMultiheadAttention)
    assert isinstance(model.bn, nn.BatchNorm2d)  # the input is untouched


def test_validator_loggers_propagate_at_info():
    for name in ("opacus.validators.module_validator", "opacus.validators.batch_norm"):
        logger = logging.getLogger(name)
        assert logger.propagate and logger.getEffectiveLevel() <= logging.INFO


def test_fix_only_replaces_modules_with_trainable_parameters(root_records):
    model = nn.Sequential(
        nn.BatchNorm1d(4).requires_grad_(False), nn.LSTM(2, 2).requires_grad_(False)
    )
    fixed = ModuleValidator.fix(model)
    assert type(fixed[0]) is nn.BatchNorm1d and type(fixed[1]) is nn.LSTM
    assert root_records == []


def test_fix_moves_the_replacement_to_the_old_device():
    class OnMeta(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2, device="meta"))

    @register_module_fixer(OnMeta)
    def _fix(module):
        return nn.Linear(2, 2)  # built on the default device

    try:
        fixed = ModuleValidator.fix(nn.Sequential(OnMeta()))
        assert isinstance(fixed[0], nn.Linear) and fixed[0].weight.device.type == "meta"
    finally:
        del ModuleValidator.FIXERS[OnMeta]


# ---------------------------------------------------------------- the BatchNorm fixer


@pytest.mark.parametrize(
    "kwargs, groups", [({}, 16), ({"num_groups": 4}, 4), ({"num_groups": 1}, 1)]
)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_fixer_group_counts(root_records, kwargs, groups, affine):
    new = bn_fixer.fix(nn.BatchNorm2d(16, affine=affine), **kwargs)
    assert type(new) is nn.GroupNorm
    assert (new.num_groups, new.num_channels, new.affine) == (groups, 16, affine)
    assert [r.name for r in root_records] == ["opacus.validators.batch_norm"]
    assert root_records[0].getMessage().startswith(BN_LINE)


@pytest.mark.parametrize("channels", [1, 3, 12, 32, 48, 64, 100])
def test_default_group_count_is_gcd_with_32(channels):
    new = bn_fixer.fix(nn.BatchNorm1d(channels))
    assert new.num_groups == math.gcd(32, channels)


def test_num_groups_reaches_the_fixer_through_fix():
    fixed = ModuleValidator.fix(TinyMobileNet(), num_groups=8)
    norms = [m for m in fixed.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 4 and all(m.num_groups == 8 for m in norms)


@pytest.mark.parametrize(
    "bn, expected",
    [
        (nn.BatchNorm1d(6), nn.InstanceNorm1d),
        (nn.BatchNorm2d(6), nn.InstanceNorm2d),
        (nn.BatchNorm3d(6), nn.InstanceNorm3d),
    ],
)
def test_replace_bn_with_in(bn, expected):
    new = bn_fixer.fix(bn, replace_bn_with_in=True)
    assert type(new) is expected and new.num_features == 6


def test_sync_batch_norm_has_no_instance_norm(root_records):
    with pytest.raises(UnsupportableModuleError, match="InstanceNorm"):
        bn_fixer.fix(nn.SyncBatchNorm(4), replace_bn_with_in=True)
    assert type(bn_fixer.fix(nn.SyncBatchNorm(4))) is nn.GroupNorm
    with pytest.raises(UnsupportableModuleError, match="'0'"):  # the path, through fix()
        ModuleValidator.fix(nn.Sequential(nn.SyncBatchNorm(4)), replace_bn_with_in=True)


def test_both_arguments_are_refused_after_the_info_line(root_records):
    with pytest.raises(ValueError, match="mutually exclusive"):
        bn_fixer.fix(nn.BatchNorm2d(8), replace_bn_with_in=True, num_groups=2)
    assert len(root_records) == 1 and root_records[0].getMessage().startswith(BN_LINE)


@pytest.mark.parametrize("num_groups", [3, 0, -2, 2.0, True])
def test_bad_num_groups_is_refused(num_groups):
    with pytest.raises(ValueError, match="num_groups"):
        bn_fixer.fix(nn.BatchNorm2d(8), num_groups=num_groups)


def test_group_norm_replacement_computes_group_norm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8, eps=1e-3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    new = ModuleValidator.fix(nn.Sequential(bn), num_groups=2)[0]
    x = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(new(x), F.group_norm(x, 2, bn.weight, bn.bias, 1e-3))


# ------------------------------------- BatchNorm subclasses that compute more (issue 16 item 10)


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's: normalise, then dropout and an activation, in one module."""

    def __init__(self, num_features, act=nn.ReLU, drop=0.0):
        super().__init__(num_features)
        self.drop = nn.Dropout(drop)
        self.act = act()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class PlainSubclass(nn.BatchNorm2d):
    """A BatchNorm2d subclass that does not change forward."""


def net_with(norm):
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(nn.Identity(), norm))


def test_batch_norm_subclass_overriding_forward_is_refused():
    model = net_with(BatchNormAct2d(8))
    with pytest.raises(UnsupportableModuleError) as info:
        ModuleValidator.fix(model)
    message = str(info.value)
    assert "'1.1'" in message and "BatchNormAct2d" in message
    assert "overrides forward" in message and "register_module_fixer" in message
    # validate points at the same remedy
    (error,) = ModuleValidator.validate(model)
    assert "'1.1'" in str(error) and "register_module_fixer" in str(error)


def test_forward_patched_on_the_instance_is_refused():
    bn = nn.BatchNorm2d(8)
    bn.forward = lambda x: torch.relu(nn.BatchNorm2d.forward(bn, x))
    with pytest.raises(UnsupportableModuleError, match="overrides forward"):
        bn_fixer.fix(bn)


def test_batch_norm_subclass_keeping_forward_is_replaced():
    model = net_with(PlainSubclass(8))
    fixed = ModuleValidator.fix(model)
    assert type(fixed[1][1]) is nn.GroupNorm and fixed[1][1].num_groups == 8


def test_registered_fixer_for_the_subclass_keeps_its_extra_computation():
    torch.manual_seed(0)
    model = net_with(BatchNormAct2d(8, act=nn.GELU)).train()

    @register_module_fixer(BatchNormAct2d)
    def _fix(module, **kwargs):
        norm = bn_fixer.fix(nn.BatchNorm2d(module.num_features), **kwargs)
        norm.load_state_dict({"weight": module.weight, "bias": module.bias})
        return nn.Sequential(norm, module.drop, module.act)

    try:
        fixed = ModuleValidator.fix(model, num_groups=4)
    finally:
        del ModuleValidator.FIXERS[BatchNormAct2d]
    assert ModuleValidator.is_valid(fixed)
    x = torch.randn(2, 3, 5, 5)
    bn = model[1][1]
    # The original function with GroupNorm in place of the normalisation.
    expected = bn.act(bn.drop(F.group_norm(model[0](x), 4, bn.weight, bn.bias, bn.eps)))
    torch.testing.assert_close(fixed(x), expected)

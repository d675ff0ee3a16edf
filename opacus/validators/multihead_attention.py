"""``nn.MultiheadAttention`` computes its projections inside ``F.multi_head_attention_forward``,
out of reach of the per-sample-gradient hooks; ``DPMultiheadAttention`` computes the same
function from hookable layers."""

from typing import List

import torch.nn as nn

from opacus.layers.dp_multihead_attention import DPMultiheadAttention
from opacus.validators.errors import (
    IllegalModuleConfigurationError,
    ShouldReplaceModuleError,
    UnsupportedModuleError,
)
from opacus.validators.utils import register_module_fixer, register_module_validator


@register_module_validator(nn.MultiheadAttention)
def validate(module: nn.MultiheadAttention) -> List[UnsupportedModuleError]:
    """``nn.MultiheadAttention`` should be replaced by ``DPMultiheadAttention``.

    Args:
        module: the module to check.

    Returns:
        the problems found (empty if none).
    """
    return [
        ShouldReplaceModuleError(
            "nn.MultiheadAttention is not supported by DP-SGD's per-sample gradients (fused "
            "projections). Use opacus.layers.DPMultiheadAttention (same arguments and outputs, "
            "loads this layer's state dict), or call ModuleValidator.fix(model)"
        )
    ]


@register_module_fixer(nn.MultiheadAttention)
def fix(module: nn.MultiheadAttention) -> DPMultiheadAttention:
    """A ``DPMultiheadAttention`` with the same options (``batch_first`` too) and weights.

    Args:
        module: the module to replace.

    Returns:
        a ``DPMultiheadAttention`` with the same configuration and weights.
    """
    param = module.out_proj.weight
    dp = DPMultiheadAttention(
        module.embed_dim,
        module.num_heads,
        dropout=module.dropout,
        bias=module.out_proj.bias is not None,
        add_bias_kv=module.bias_k is not None,
        add_zero_attn=module.add_zero_attn,
        kdim=module.kdim,
        vdim=module.vdim,
        batch_first=module.batch_first,
        device=param.device,
        dtype=param.dtype,
    )
    dp.load_state_dict(module.state_dict())
    for name, p in module.named_parameters():
        for target in _DP_PARAMETERS_OF.get(name, (name,)):
            dp.get_parameter(target).requires_grad_(p.requires_grad)
    return dp.train(module.training)


# nn.MultiheadAttention's parameters -> the DPMultiheadAttention parameters they load into.
_DP_PARAMETERS_OF = {
    "in_proj_weight": ("qlinear.weight", "klinear.weight", "vlinear.weight"),
    "in_proj_bias": ("qlinear.bias", "klinear.bias", "vlinear.bias"),
    "q_proj_weight": ("qlinear.weight",),
    "k_proj_weight": ("klinear.weight",),
    "v_proj_weight": ("vlinear.weight",),
    "bias_k": ("seq_bias_k.bias",),
    "bias_v": ("seq_bias_v.bias",),
}


def _uses_dp_attention(encoder: nn.TransformerEncoder) -> bool:
    return any(
        isinstance(getattr(layer, "self_attn", None), DPMultiheadAttention)
        for layer in encoder.layers
    )


@register_module_validator(nn.TransformerEncoder)
def validate_transformer_encoder(module: nn.TransformerEncoder) -> List[UnsupportedModuleError]:
    """``use_nested_tensor=True`` with DP attention layers cannot run in eval mode.

    The flag is decided when the encoder is built (for ``nn.MultiheadAttention``); with it,
    evaluation with a padding mask feeds the layers nested tensors, which only torch's fused
    attention kernel accepts.
    """
    if not getattr(module, "use_nested_tensor", False) or not _uses_dp_attention(module):
        return []
    return [
        IllegalModuleConfigurationError(
            "use_nested_tensor=True with DPMultiheadAttention layers: in evaluation with a "
            "padding mask torch would feed them nested tensors, which they do not support. "
            "Set use_nested_tensor=False, or call ModuleValidator.fix(model)"
        )
    ]


@register_module_fixer(nn.TransformerEncoder)
def fix_transformer_encoder(module: nn.TransformerEncoder) -> nn.TransformerEncoder:
    """The encoder (its layers already fixed) with nested tensors off if its layers need it."""
    if _uses_dp_attention(module):
        module.use_nested_tensor = False
    return module

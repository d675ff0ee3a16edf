"""``nn.RNN`` runs in a fused kernel that per-sample-gradient hooks cannot see; ``DPRNN`` computes
the same function from hookable layers. Also home of the conversion shared with LSTM and GRU."""

from typing import List

import torch.nn as nn

from opacus.layers.dp_rnn import DPRNN, DPRNNBase
from opacus.validators.errors import ShouldReplaceModuleError, UnsupportedModuleError
from opacus.validators.utils import register_module_fixer, register_module_validator


def replacement_error(module: nn.RNNBase, dp_name: str) -> List[UnsupportedModuleError]:
    """The error for a ``torch.nn`` recurrent layer whose DP twin is ``opacus.layers.<dp_name>``."""
    return [
        ShouldReplaceModuleError(
            f"nn.{type(module).__name__} is not supported by DP-SGD's per-sample gradients (fused "
            f"kernel). Use opacus.layers.{dp_name} (same arguments and outputs; loads this "
            "layer's state dict), or call ModuleValidator.fix(model)"
        )
    ]


def convert(module: nn.RNNBase, dp_module: DPRNNBase) -> DPRNNBase:
    """Give ``dp_module`` the weights, dtype/device, trainability and mode of ``module``."""
    param = next(module.parameters())
    dp_module = dp_module.to(device=param.device, dtype=param.dtype)
    dp_module.load_state_dict(module.state_dict())
    for old_name, p in module.named_parameters():
        getattr(dp_module, old_name).requires_grad_(p.requires_grad)
    return dp_module.train(module.training)


def _common_kwargs(module: nn.RNNBase) -> dict:
    return dict(
        num_layers=module.num_layers,
        bias=module.bias,
        batch_first=module.batch_first,
        dropout=module.dropout,
        bidirectional=module.bidirectional,
    )


@register_module_validator(nn.RNN)
def validate(module: nn.RNN) -> List[UnsupportedModuleError]:
    """``nn.RNN`` should be replaced by ``DPRNN``."""
    return replacement_error(module, "DPRNN")


@register_module_fixer(nn.RNN)
def fix(module: nn.RNN) -> DPRNN:
    """A ``DPRNN`` with the same configuration and weights."""
    return convert(
        module,
        DPRNN(
            module.input_size,
            module.hidden_size,
            nonlinearity=module.nonlinearity,
            **_common_kwargs(module),
        ),
    )

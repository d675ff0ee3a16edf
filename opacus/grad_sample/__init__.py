"""Per-sample gradients (or their norms) for every trainable parameter of a model.

Importing the package registers the grad samplers of every supported layer family (one module
per family) in ``opacus.grad_sample.registry``.
"""

from opacus.grad_sample import (  # noqa: F401  (imported to register their samplers)
    conv,
    dp_multihead_attention,
    dp_rnn,
    embedding,
    embedding_norm_sample,
    group_norm,
    instance_norm,
    layer_norm,
    linear,
    rms_norm,
    transformers_layers,
)
from opacus.grad_sample.grad_sample_module import (
    GradSampleHooks,
    GradSampleModule,
    create_or_accumulate_grad_sample,
)
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
    GradSampleHooksFastGradientClippingFSDP,
    GradSampleModuleFastGradientClippingFSDP,
)
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_tp import (
    GradSampleHooksFastGradientClippingTP,
    GradSampleModuleFastGradientClippingTP,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleHooks, AbstractGradSampleModule
from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights
from opacus.grad_sample.gsm_no_op import GradSampleHooksNoOp, GradSampleModuleNoOp
from opacus.grad_sample.registry import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.utils import get_gsm_class, prepare_module, wrap_model

__all__ = [
    "AbstractGradSampleHooks",
    "AbstractGradSampleModule",
    "GradSampleHooks",
    "GradSampleHooksFastGradientClipping",
    "GradSampleHooksFastGradientClippingFSDP",
    "GradSampleHooksFastGradientClippingTP",
    "GradSampleHooksNoOp",
    "GradSampleModule",
    "GradSampleModuleExpandedWeights",
    "GradSampleModuleFastGradientClipping",
    "GradSampleModuleFastGradientClippingFSDP",
    "GradSampleModuleFastGradientClippingTP",
    "GradSampleModuleNoOp",
    "create_or_accumulate_grad_sample",
    "get_gsm_class",
    "prepare_module",
    "register_grad_sampler",
    "register_norm_sampler",
    "wrap_model",
]

"""Per-sample gradients, ghost norms and clipped sums of Hugging Face ``transformers`` layers.

Registered lazily: importing opacus never imports ``transformers`` (which takes ~0.5 s and is
optional). ``install()`` (run when ``opacus.grad_sample`` is imported) registers the samplers at
once for every listed ``transformers`` module already imported, and otherwise the moment it gets
imported, through a finder on ``sys.meta_path`` that only wraps the loader of those few module
names. ``register_transformers_layers()`` registers them eagerly (it imports the modules).

Layers:

- ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ...): ``y = x @ W + b`` with ``W`` of shape
  ``(in, out)``, i.e. an ``nn.Linear`` whose weight is stored transposed. The per-sample gradient
  of ``W`` is ``sum_t a_{i,t} b_{i,t}^T`` of shape ``(in, out)``; its Frobenius norm does not
  depend on the orientation, so the ghost norm is the one of ``nn.Linear`` (Li et al. 2022); the
  clipped sum is ``A^T (c * B)`` over the stacked tokens (book-keeping, Bu et al. 2023). GPT-2's
  fused QKV projection ``c_attn`` is such a ``Conv1D`` (``nn.Linear`` ones are plain Linears): it
  needs nothing more.
- RMSNorm-style norms of Llama, Mistral and Qwen2 (``weight * x / sqrt(mean(x^2) + eps)``, the
  epsilon in ``variance_epsilon``): the per-sample gradient of ``weight`` is ``sum_t x_hat * b``
  (Zhang & Sennrich 2019), ``(B, hidden)``; the norm sampler takes its row norms (it is as small
  as the parameter) and the clipped sum contracts it with the weights.
- ``nn.LayerNorm`` (GPT-2, BERT, ...; registered unconditionally, it is torch's): a norm sampler
  on top of its grad sampler (``layer_norm.py``), so it no longer takes the materialised path
  under ghost clipping; and a clipped sum, so that a LayerNorm no longer rules out
  book-keeping (one backward pass instead of two) for the whole model.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from opacus.grad_sample.buffers import reusable_empty
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.grad_sample.linear import (
    _as_sequences,
    compute_linear_norm_sample,
    linear_norms_keeping_grads,
)
from opacus.grad_sample.registry import (
    KEEPS_GRADS_ATTR,
    SUMS_OVER_SEQUENCE_ATTR,
    register_clipped_sum_sampler,
    register_grad_sampler,
    register_norm_sampler,
    weighted_sums,
)
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n

__all__ = [
    "compute_conv1d_clipped_sum",
    "compute_conv1d_grad_sample",
    "compute_conv1d_norm_sample",
    "compute_layer_norm_clipped_sum",
    "compute_layer_norm_norm_sample",
    "compute_rms_norm_style_clipped_sum",
    "compute_rms_norm_style_grad_sample",
    "compute_rms_norm_style_norm_sample",
    "install",
    "register_transformers_layers",
    "tied_embedding_linear_cross_term",
]


# ------------------------------------------------------------------------------ Conv1D
def compute_conv1d_grad_sample(
    layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ``transformers`` ``Conv1D`` (``y = x @ weight + bias``).

    Args:
        layer: the layer, ``weight`` of shape ``(in, out)``.
        activations: ``[x]`` with ``x`` of shape ``(B, ..., in)``.
        backprops: gradient w.r.t. the output, shape ``(B, ..., out)``.

    Returns:
        ``{weight: (B, in, out), bias: (B, out)}`` for the parameters that require grad.
    """
    a, b = _as_sequences(activations[0], backprops)
    ret = {}
    if layer.weight.requires_grad:
        out = reusable_empty(
            layer, "weight", (a.shape[0], a.shape[2], b.shape[2]), dtype=a.dtype, device=a.device
        )
        if a.shape[1] == 1:
            torch.mul(a.transpose(1, 2), b, out=out)  # one position: an outer product
        else:
            torch.bmm(a.transpose(1, 2), b, out=out)  # (B, in, T) @ (B, T, out)
        ret[layer.weight] = out
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = b.sum(dim=1)
    return ret


setattr(compute_conv1d_grad_sample, SUMS_OVER_SEQUENCE_ATTR, True)


def compute_conv1d_norm_sample(
    layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient L2 norms of a ``Conv1D`` (ghost clipping): those of ``nn.Linear``,
    since a Frobenius norm does not see the transposition.

    Returns:
        ``{weight: (B,), bias: (B,)}`` for the parameters that require grad.
    """
    return compute_linear_norm_sample(layer, activations, backprops)


def _conv1d_norms_keeping_grads(
    layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor
):
    """``(norms, kept)`` of a ``Conv1D`` for book-keeping: ``linear_norms_keeping_grads``."""
    return linear_norms_keeping_grads(layer, activations, backprops, in_out=True)


setattr(compute_conv1d_norm_sample, KEEPS_GRADS_ATTR, _conv1d_norms_keeping_grads)


def compute_conv1d_clipped_sum(
    layer: nn.Module,
    activations: List[torch.Tensor],
    backprops: torch.Tensor,
    weights: torch.Tensor,
) -> Dict[nn.Parameter, torch.Tensor]:
    """``sum_i weights_i * g_i`` of a ``Conv1D``'s per-sample gradients ``g_i``.

    Returns:
        ``{weight: (in, out), bias: (out,)}`` for the parameters that require grad.
    """
    a, b = _as_sequences(activations[0], backprops)
    w = weights.to(b.dtype)
    ret = {}
    if layer.weight.requires_grad:
        # Re-weight whichever of a and b is smaller (a copy of it), then one matrix product.
        if a.shape[2] <= b.shape[2]:
            a_w, b_w = a * w.view(-1, 1, 1), b
        else:
            a_w, b_w = a, b * w.view(-1, 1, 1)
        ret[layer.weight] = a_w.reshape(-1, a.shape[2]).t() @ b_w.reshape(-1, b.shape[2])
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = w @ b.sum(dim=1)
    return ret


# ----------------------------------------------------------------- RMSNorm-style norms
def _rms_eps(layer: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(layer, attr, None)
        if eps is not None:
            return float(eps)
    raise TypeError(
        f"{type(layer).__name__}: an RMSNorm-style layer needs its epsilon in `variance_epsilon` "
        "or `eps`; register a grad sampler of its own for this layer"
    )


def _rms_norm_style_grad(layer: nn.Module, x: torch.Tensor, backprops: torch.Tensor):
    """``(B, hidden)`` per-sample gradient of ``layer.weight``."""
    # x_hat as the layer computes it: in float32, then back in the input's dtype.
    x32 = x.to(torch.float32)
    x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + _rms_eps(layer))
    x_hat = x_hat.to(x.dtype)
    dtype = torch.promote_types(torch.promote_types(x.dtype, backprops.dtype), layer.weight.dtype)
    return sum_over_all_but_batch_and_last_n(x_hat.to(dtype) * backprops.to(dtype), 1)


def compute_rms_norm_style_grad_sample(
    layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an RMSNorm-style layer (``LlamaRMSNorm`` and its copies).

    Args:
        layer: the layer (``weight`` of shape ``(hidden,)``, ``variance_epsilon``).
        activations: ``[x]`` with ``x`` of shape ``(B, ..., hidden)``.
        backprops: gradient w.r.t. the output, same shape as ``x``.

    Returns:
        ``{weight: (B, hidden)}`` if the weight requires grad.
    """
    if not layer.weight.requires_grad:
        return {}
    return {layer.weight: _rms_norm_style_grad(layer, activations[0], backprops)}


def compute_rms_norm_style_norm_sample(
    layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms ``(B,)`` of an RMSNorm-style layer (ghost clipping)."""
    return _row_norms(compute_rms_norm_style_grad_sample(layer, activations, backprops))


def _rms_norm_style_norms_keeping_grads(
    layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor
):
    """``(norms, per-sample gradients)`` for book-keeping: the gradient is as small as the
    parameter, so keeping it spares recomputing it for the clipped sum."""
    return _norms_and_grads(compute_rms_norm_style_grad_sample(layer, activations, backprops))


setattr(compute_rms_norm_style_norm_sample, KEEPS_GRADS_ATTR, _rms_norm_style_norms_keeping_grads)


def compute_rms_norm_style_clipped_sum(
    layer: nn.Module,
    activations: List[torch.Tensor],
    backprops: torch.Tensor,
    weights: torch.Tensor,
) -> Dict[nn.Parameter, torch.Tensor]:
    """``sum_i weights_i * g_i`` of an RMSNorm-style layer, shape ``(hidden,)``."""
    return _weighted_sums(
        compute_rms_norm_style_grad_sample(layer, activations, backprops), weights
    )


# ------------------------------------------------------------------------- nn.LayerNorm
def _row_norms(per_sample: Dict[nn.Parameter, torch.Tensor]) -> Dict[nn.Parameter, torch.Tensor]:
    return {
        p: torch.linalg.vector_norm(
            g.reshape(g.shape[0], -1), dim=1, dtype=torch.promote_types(g.dtype, torch.float32)
        )
        for p, g in per_sample.items()
    }


def _norms_and_grads(per_sample: Dict[nn.Parameter, torch.Tensor]):
    return _row_norms(per_sample), per_sample


_weighted_sums = weighted_sums


@register_norm_sampler(nn.LayerNorm)
def compute_layer_norm_norm_sample(
    layer: nn.LayerNorm, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms ``{param: (B,)}`` of an ``nn.LayerNorm`` (ghost clipping)."""
    return _row_norms(compute_layer_norm_grad_sample(layer, activations, backprops))


def _layer_norm_norms_keeping_grads(
    layer: nn.LayerNorm, activations: List[torch.Tensor], backprops: torch.Tensor
):
    """``(norms, per-sample gradients)`` for book-keeping (as small as the parameters)."""
    return _norms_and_grads(compute_layer_norm_grad_sample(layer, activations, backprops))


setattr(compute_layer_norm_norm_sample, KEEPS_GRADS_ATTR, _layer_norm_norms_keeping_grads)


@register_clipped_sum_sampler(nn.LayerNorm)
def compute_layer_norm_clipped_sum(
    layer: nn.LayerNorm,
    activations: List[torch.Tensor],
    backprops: torch.Tensor,
    weights: torch.Tensor,
) -> Dict[nn.Parameter, torch.Tensor]:
    """``{param: sum_i weights_i * g_i}`` of an ``nn.LayerNorm`` (shapes of the parameters)."""
    return _weighted_sums(compute_layer_norm_grad_sample(layer, activations, backprops), weights)


# ------------------------------------------------------- tied input/output embeddings
def _without_padding(embedding: nn.Embedding, ids: torch.Tensor, b: torch.Tensor):
    if embedding.padding_idx is None:
        return b
    return b * (ids != embedding.padding_idx).unsqueeze(-1).to(b.dtype)


def tied_embedding_linear_cross_term(
    embedding: nn.Embedding,
    ids: torch.Tensor,
    embedding_backprops: torch.Tensor,
    head_activations: torch.Tensor,
    head_backprops: Optional[torch.Tensor],
) -> torch.Tensor:
    """``<E_i, H_i>`` per sample, for a weight shared by an ``nn.Embedding`` and an
    ``nn.Linear`` head (GPT-2's ``wte`` / ``lm_head``), without either per-sample gradient.

    With ``E_i = sum_t onehot(ids_t) b_t^T`` (the embedding's per-sample gradient) and
    ``H_i = sum_s g_s a_s^T`` (the head's), ``||E_i + H_i||^2 = ||E_i||^2 + ||H_i||^2 +
    2 <E_i, H_i>`` and ``<E_i, H_i> = sum_{t,s} g_s[ids_t] (b_t . a_s)``: a gather of the head's
    output gradients at the looked-up ids and a ``(T_head, T_emb)`` product per sample. The
    shared parameter's norm is then exact from the two ghost norms and this term.

    Where book-keeping kept the head's per-sample gradient ``H`` (``(B, V, d)``), ``<E_i, H_i> =
    sum_t H_i[ids_t] . b_t``: a gather of ``T_emb`` rows per sample.

    Args:
        embedding: the embedding (``padding_idx`` rows get no gradient and are left out).
        ids: ``(B, T_emb)`` looked-up indices.
        embedding_backprops: ``(B, T_emb, d)`` gradient w.r.t. the embedding's output.
        head_activations: ``(B, T_head, d)`` input of the head; or, with ``head_backprops``
            None, the head's per-sample weight gradient ``(B, V, d)``.
        head_backprops: ``(B, T_head, V)`` gradient w.r.t. the head's output, or None.

    Returns:
        ``(B,)`` cross terms.

    Raises:
        NotImplementedError: ``scale_grad_by_freq`` (rows rescaled by their counts).
    """
    if embedding.scale_grad_by_freq:
        raise NotImplementedError(
            "tied_embedding_linear_cross_term: scale_grad_by_freq=True is not supported; "
            "materialise the per-sample gradients instead"
        )
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    b = embedding_backprops.reshape(batch, ids.shape[1], -1)
    if head_backprops is None:
        grad = head_activations
        dtype = torch.promote_types(torch.promote_types(b.dtype, grad.dtype), torch.float32)
        b = _without_padding(embedding, ids, b.to(dtype))
        rows = grad.gather(1, ids.unsqueeze(-1).expand(-1, -1, grad.shape[2]))  # (B, T_emb, d)
        return (rows.to(dtype) * b).sum(dim=(1, 2))
    a, g = _as_sequences(head_activations, head_backprops)
    dtype = torch.promote_types(torch.promote_types(b.dtype, a.dtype), torch.float32)
    b, a, g = _without_padding(embedding, ids, b.to(dtype)), a.to(dtype), g.to(dtype)
    gathered = g.gather(2, ids.unsqueeze(1).expand(-1, g.shape[1], -1))  # (B, T_head, T_emb)
    return (gathered * torch.bmm(a, b.transpose(1, 2))).sum(dim=(1, 2))


# ------------------------------------------------------------------------ registration
def _register_conv1d(module) -> None:
    cls = module.Conv1D
    register_grad_sampler(cls)(compute_conv1d_grad_sample)
    register_norm_sampler(cls)(compute_conv1d_norm_sample)
    register_clipped_sum_sampler(cls)(compute_conv1d_clipped_sum)


def _rms_norm_registrar(class_name: str) -> Callable:
    def register(module) -> None:
        cls = getattr(module, class_name, None)
        if cls is None:  # another transformers version: leave it to the fallback
            return
        register_grad_sampler(cls)(compute_rms_norm_style_grad_sample)
        register_norm_sampler(cls)(compute_rms_norm_style_norm_sample)
        register_clipped_sum_sampler(cls)(compute_rms_norm_style_clipped_sum)

    return register


# transformers module name -> what registers its layers once it is imported.
_REGISTRARS: Dict[str, Callable] = {
    "transformers.pytorch_utils": _register_conv1d,
    "transformers.models.llama.modeling_llama": _rms_norm_registrar("LlamaRMSNorm"),
    "transformers.models.mistral.modeling_mistral": _rms_norm_registrar("MistralRMSNorm"),
    "transformers.models.qwen2.modeling_qwen2": _rms_norm_registrar("Qwen2RMSNorm"),
}


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader, then registers the module's layers."""

    def __init__(self, loader, register: Callable):
        self._loader = loader
        self._register = register

    def __getattr__(self, name):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._register(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the module names of ``_REGISTRARS`` it wraps the loader that
    the other finders give, so that the layers get registered right after the import."""

    def __init__(self):
        self._busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        register = _REGISTRARS.get(fullname)
        if register is None or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.on = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader, register)
        return spec


_FINDER = _PostImportFinder()


def install() -> None:
    """Register the samplers of every ``transformers`` module already imported, and have the
    others registered when they are imported; idempotent, imports nothing."""
    for name, register in _REGISTRARS.items():
        module = sys.modules.get(name)
        if module is not None:
            register(module)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def register_transformers_layers() -> List[str]:
    """Import the ``transformers`` modules of the supported layers and register their samplers.

    Returns:
        the names of the modules registered (empty if ``transformers`` is not installed).
    """
    done = []
    for name, register in _REGISTRARS.items():
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        register(module)
        done.append(name)
    return done


install()

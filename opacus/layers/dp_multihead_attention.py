"""Multi-head attention built from hookable layers, so DP-SGD gets per-sample gradients.

``torch.nn.MultiheadAttention`` keeps its projections in one fused ``in_proj_weight`` used through
``F.multi_head_attention_forward``, which the per-sample-gradient hooks cannot see.
``DPMultiheadAttention`` computes the same function (Vaswani et al. 2017, eq. 1 and the multi-head
definition of section 3.2.2) with separate ``nn.Linear`` projections ``qlinear``, ``klinear``,
``vlinear``, ``out_proj`` and ``SequenceBias`` layers for ``add_bias_kv``.

Layout promise (where this implementation differs from Opacus 1.6): every inner layer receives
tensors in the layout the module was built for, the batch on dim 0 when ``batch_first=True`` and on
dim 1 otherwise. The per-sample-gradient hooks are told the batch dimension once, for the whole
model; an inner layer fed a transposed tensor would have its per-sample gradients taken over the
sequence instead of the batch, mixing samples (and breaking the clipping that the privacy guarantee
rests on).
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class SequenceBias(nn.Module):
    """Append a learned vector as one extra step at the end of the sequence dimension.

    ``(L, N, E) -> (L + 1, N, E)``, or ``(N, L, E) -> (N, L + 1, E)`` with ``batch_first``.
    This is the ``bias_k`` / ``bias_v`` of ``nn.MultiheadAttention(add_bias_kv=True)``.

    Args:
        embed_dim: the feature size E.
        batch_first: True for ``(batch, seq, E)`` inputs, False for ``(seq, batch, E)``.
    """

    def __init__(self, embed_dim: int, batch_first: bool = False):
        super().__init__()
        self.embed_dim = embed_dim
        self.batch_first = batch_first
        self.bias = nn.Parameter(torch.empty(embed_dim))
        self.reset_parameters()

    def reset_parameters(self):
        """Re-draw ``bias`` (shape ``(embed_dim,)``) from N(0, 2 / (1 + embed_dim)) in place."""
        # Same initialisation as nn.MultiheadAttention's bias_k / bias_v of shape (1, 1, E).
        nn.init.normal_(self.bias, std=math.sqrt(2.0 / (1 + self.embed_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``bias`` to every sequence as one extra final step.

        Args:
            x: ``(L, N, E)``, or ``(N, L, E)`` when ``batch_first``, with ``E == embed_dim``.

        Returns:
            ``(L + 1, N, E)`` (or ``(N, L + 1, E)``) whose last step is ``bias`` for every sample.

        Example:
            >>> sb = SequenceBias(4, batch_first=True)
            >>> sb(torch.zeros(2, 3, 4)).shape
            torch.Size([2, 4, 4])

        Raises:
            ValueError: the input is not 3-d with ``embed_dim`` features.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
            raise ValueError(
                f"SequenceBias expects a {layout} tensor with E={self.embed_dim}, "
                f"got shape {tuple(x.shape)}"
            )
        if self.batch_first:
            n, _, e = x.shape
            return torch.cat([x, self.bias.view(1, 1, e).expand(n, 1, e)], dim=1)
        _, n, e = x.shape
        return torch.cat([x, self.bias.view(1, 1, e).expand(1, n, e)], dim=0)

    def extra_repr(self) -> str:
        """Constructor arguments shown in ``repr(module)``."""
        return f"embed_dim={self.embed_dim}, batch_first={self.batch_first}"


def _additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype, name: str):
    """Boolean masks (True = do not attend) become 0 / -inf; float masks are added as given."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    if not torch.is_floating_point(mask):
        raise TypeError(f"DPMultiheadAttention: {name} must be bool or float, got {mask.dtype}")
    return mask.to(dtype)


class DPMultiheadAttention(nn.Module):
    """Drop-in replacement for ``torch.nn.MultiheadAttention`` that supports DP-SGD.

    Same constructor and ``forward`` as ``nn.MultiheadAttention`` and the same outputs given
    the same weights. Its state dict has ``nn.MultiheadAttention``'s format (``in_proj_weight``
    or ``q/k/v_proj_weight``, ``in_proj_bias``, ``bias_k``, ``bias_v``, ``out_proj.*``) and it
    loads that format as well as its internal one, directly or nested in a bigger model.

    Args:
        embed_dim: the model dimension E.
        num_heads: the number of heads (must divide ``embed_dim``).
        dropout: dropout probability on the attention weights.
        bias: whether the input and output projections have biases.
        add_bias_kv: append a learned bias to the key and value sequences.
        add_zero_attn: append a zero step to the key and value sequences.
        kdim: the number of key features (``embed_dim`` if None).
        vdim: the number of value features (``embed_dim`` if None).
        batch_first: True for ``(batch, seq, feature)`` inputs and outputs, False for ``(seq, batch,
            feature)``.
        device: the device of the parameters.
        dtype: the dtype of the parameters.

    Raises:
        ValueError: ``embed_dim`` or ``num_heads`` is not positive, or ``num_heads`` does not divide
            ``embed_dim``.
    """

    # Read by nn.TransformerEncoder(Layer): False keeps them off their fused fast path, which
    # would bypass this module (it needs the packed in_proj_weight that we do not have).
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"DPMultiheadAttention: embed_dim ({embed_dim}) and num_heads ({num_heads}) "
                "must be positive"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"DPMultiheadAttention: embed_dim ({embed_dim}) must be divisible by "
                f"num_heads ({num_heads})"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn

        self.qlinear = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.klinear = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.vlinear = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.seq_bias_k = SequenceBias(embed_dim, batch_first).to(**factory)
            self.seq_bias_v = SequenceBias(embed_dim, batch_first).to(**factory)
        else:
            self.seq_bias_k = self.seq_bias_v = None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self._reset_parameters()
        self.register_load_state_dict_pre_hook(_load_from_torch_mha)
        self.register_state_dict_post_hook(_save_as_torch_mha)

    @property
    def add_bias_kv(self) -> bool:
        """Whether learned ``bias_k`` / ``bias_v`` steps are appended to keys and values.

        True when the module was built with ``add_bias_kv=True`` (``seq_bias_k`` and
        ``seq_bias_v`` are then :class:`SequenceBias` layers), as in ``nn.MultiheadAttention``.
        """
        return self.seq_bias_k is not None

    def _reset_parameters(self):
        # nn.MultiheadAttention: xavier_uniform_ on the fused (3E, E) in_proj_weight, zero biases.
        bound = math.sqrt(6.0 / (self.embed_dim + 3 * self.embed_dim))
        for linear in (self.qlinear, self.klinear, self.vlinear):
            nn.init.uniform_(linear.weight, -bound, bound)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def state_dict(self, destination=None, prefix="", keep_vars=False):
        """The parameters in ``nn.MultiheadAttention``'s format: same keys, shapes and order.

        ``in_proj_weight`` (the q, k, v weights stacked, ``(3E, E)``) when
        ``kdim == vdim == embed_dim``, else ``q_proj_weight`` ``(E, E)``, ``k_proj_weight``
        ``(E, kdim)`` and ``v_proj_weight`` ``(E, vdim)``; ``in_proj_bias`` ``(3E,)`` with
        ``bias``; ``bias_k`` and ``bias_v`` ``(1, 1, E)`` with ``add_bias_kv``; ``out_proj.weight``
        and ``out_proj.bias``. So ``nn.MultiheadAttention(...).load_state_dict(dp.state_dict())``
        works. The conversion is a state-dict hook, so a parent model saves this layer in the same
        format. The stacked ``in_proj_weight``/``in_proj_bias`` are new tensors (with
        ``keep_vars=True``, functions of the parameters rather than parameters);
        ``named_parameters()`` reports the projections ``qlinear``, ``klinear``, ``vlinear``.

        Args:
            destination: a dict to write into (a new ordered dict if None).
            prefix: a prefix for every key.
            keep_vars: keep the tensors attached to autograd.
        """
        return super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict):
        """Load an ``nn.MultiheadAttention`` state dict or one in the internal format (strict).

        ``in_proj_weight``/``in_proj_bias`` are split into the q/k/v projections,
        ``q/k/v_proj_weight`` (different ``kdim``/``vdim``) map onto them, and
        ``bias_k``/``bias_v`` of shape ``(1, 1, E)`` onto ``seq_bias_k/v.bias``; internal keys
        (``qlinear.weight``...) load unchanged. The conversion is a load pre-hook, so it also
        applies when a parent module loads a checkpoint.

        Args:
            state_dict: a state dict with ``nn.MultiheadAttention``'s keys or this layer's own.
        """
        return super().load_state_dict(state_dict)

    def unsqueeze_0_2(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` with singleton dims inserted at positions 0 and 2: ``(a, b) -> (1, a, 1, b)``.

        Broadcasts a per-(query, key) table over batch and heads in a ``(N, L, H, S)`` layout.

        Args:
            t: a tensor.
        """
        return t.unsqueeze(0).unsqueeze(2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        average_attn_weights: bool = True,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention output ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``) and weights.

        Arguments as in ``nn.MultiheadAttention.forward``: ``key_padding_mask`` ``(N, S)`` and
        ``attn_mask`` ``(L, S)`` or ``(N * num_heads, L, S)``, boolean (True = masked) or
        additive float; ``is_causal`` is a hint that ``attn_mask`` is the causal mask and, as in
        torch, requires it. Weights are ``(N, L, S)`` averaged over heads, or
        ``(N, num_heads, L, S)`` with ``average_attn_weights=False``; ``None`` unless
        ``need_weights``. Unbatched 2-D inputs ``(L, E)`` are accepted too.

        Args:
            query: the queries, in the ``batch_first`` layout.
            key: the keys.
            value: the values.
            key_padding_mask: ``(batch, source length)``: True (or -inf) marks keys to ignore.
            need_weights: also return the attention weights.
            attn_mask: a ``(L, S)`` or ``(batch * num_heads, L, S)`` mask added to (or masking) the
                scores.
            is_causal: a hint that ``attn_mask`` is the causal mask (it must still be given).
            average_attn_weights: average the returned weights over the heads.

        Raises:
            RuntimeError: ``is_causal`` is True without ``attn_mask``.
        """
        is_batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "DPMultiheadAttention: is_causal=True needs attn_mask (is_causal is only a hint "
                "that attn_mask is causal, as in nn.MultiheadAttention); pass e.g. "
                "nn.Transformer.generate_square_subsequent_mask(L) as attn_mask"
            )
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            query, key, value = (t.unsqueeze(batch_dim) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)

        q, k, v = self._project_heads(query, key, value)
        n, _, tgt_len, _ = q.shape
        mask = self._merged_mask(key_padding_mask, attn_mask, n, tgt_len, k.shape[2], q.dtype)
        if need_weights:
            attn, weights = self._attention_with_weights(q, k, v, mask)
        else:
            # Torch drops the mask for the causal kernel in exactly this case; so do we.
            use_causal = is_causal and key_padding_mask is None
            attn = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if use_causal else mask,
                dropout_p=self.dropout.p if self.training else 0.0,
                is_causal=use_causal,
            )
            weights = None

        attn = attn.transpose(1, 2).reshape(n, tgt_len, self.embed_dim)
        if not self.batch_first:
            attn = attn.transpose(0, 1)
        output = self.out_proj(attn)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if is_batched:
            return output, weights
        return output.squeeze(batch_dim), None if weights is None else weights.squeeze(0)

    def _project_heads(self, query, key, value):
        """q, k, v of shape ``(N, H, L or S', head_dim)`` (S' counting the added keys)."""
        # The inner layers see the promised layout (batch on `batch_dim`); see module docstring.
        q = self.qlinear(query)
        k = self.klinear(key)
        v = self.vlinear(value)
        if self.seq_bias_k is not None:
            k = self.seq_bias_k(k)
            v = self.seq_bias_v(v)
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))

        n = q.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = (t.reshape(n, t.shape[1], heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = q.new_zeros(n, heads, 1, head_dim)
            k = torch.cat([k, zeros], dim=2)
            v = torch.cat([v, zeros], dim=2)
        return q, k, v

    def _attention_with_weights(self, q, k, v, mask):
        """Explicit softmax attention: the output ``(N, H, L, head_dim)`` and its weights."""
        # Scale q before the product, as torch does, so the results agree to the last bits.
        scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = self.dropout(torch.softmax(scores, dim=-1))
        return weights @ v, weights

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Validate input shapes the way nn.MultiheadAttention does; True if batched (3-D)."""
        name = "DPMultiheadAttention"
        if any(t.is_nested for t in (query, key, value)):
            raise ValueError(
                f"{name}: nested tensor inputs are not supported; pad them (to_padded_tensor) "
                "and pass key_padding_mask. Inside nn.TransformerEncoder set "
                "use_nested_tensor=False (ModuleValidator.fix does)"
            )
        if query.dim() not in (2, 3):
            raise ValueError(f"{name}: query must be 2-D (unbatched) or 3-D, got {query.dim()}-D")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"{name}: query, key and value must have the same number of dimensions, got "
                f"{query.dim()}, {key.dim()}, {value.dim()}"
            )
        if query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"{name}: query's last dimension is {query.shape[-1]}, expected embed_dim="
                f"{self.embed_dim}"
            )
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"{name}: key/value last dimensions are {key.shape[-1]}/{value.shape[-1]}, "
                f"expected kdim={self.kdim}/vdim={self.vdim}"
            )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"{name}: key and value must agree on the sequence and batch dimensions, got "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        return self._check_batch_and_masks(query, key, key_padding_mask, attn_mask)

    def _check_batch_and_masks(self, query, key, key_padding_mask, attn_mask) -> bool:
        """Second half of ``_check_shapes``: batch sizes and mask ranks; True if batched."""
        name = "DPMultiheadAttention"
        is_batched = query.dim() == 3
        if is_batched:
            b = 0 if self.batch_first else 1
            if query.shape[b] != key.shape[b]:
                layout = "batch_first=True: (N, L, E)" if self.batch_first else "(L, N, E)"
                raise ValueError(
                    f"{name}: query and key have different batch sizes ({query.shape[b]} vs "
                    f"{key.shape[b]}) in the layout {layout}; check batch_first"
                )
        if key_padding_mask is not None:
            expected = key.dim() - 1
            if key_padding_mask.dim() != expected:
                raise ValueError(
                    f"{name}: key_padding_mask must be {expected}-D for "
                    f"{'batched' if is_batched else 'unbatched'} inputs, got "
                    f"{key_padding_mask.dim()}-D"
                )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"{name}: attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        return is_batched

    def _merged_mask(self, key_padding_mask, attn_mask, n, tgt_len, src_len, dtype):
        """One additive mask broadcastable to ``(N, H, L, S')``, S' counting the added keys."""
        added = int(self.add_bias_kv) + int(self.add_zero_attn)
        mask = None
        attn = _additive_mask(attn_mask, dtype, "attn_mask")
        if attn is not None:
            orig = src_len - added
            if attn.dim() == 2:
                if attn.shape != (tgt_len, orig):
                    raise ValueError(
                        f"DPMultiheadAttention: 2-D attn_mask has shape {tuple(attn.shape)}, "
                        f"expected (L, S) = {(tgt_len, orig)}"
                    )
                attn = attn.view(1, 1, tgt_len, orig)
            else:
                if attn.shape != (n * self.num_heads, tgt_len, orig):
                    raise ValueError(
                        f"DPMultiheadAttention: 3-D attn_mask has shape {tuple(attn.shape)}, "
                        f"expected (N * num_heads, L, S) = {(n * self.num_heads, tgt_len, orig)}"
                    )
                attn = attn.view(n, self.num_heads, tgt_len, orig)
            # The appended bias / zero keys are never masked by attn_mask (as in torch).
            mask = F.pad(attn, (0, added))
        pad = _additive_mask(key_padding_mask, dtype, "key_padding_mask")
        if pad is not None:
            orig = src_len - added
            if pad.shape != (n, orig):
                raise ValueError(
                    f"DPMultiheadAttention: key_padding_mask has shape {tuple(pad.shape)}, "
                    f"expected (N, S) = {(n, orig)}"
                )
            pad = F.pad(pad, (0, added)).view(n, 1, 1, src_len)
            mask = pad if mask is None else mask + pad
        return mask

    def extra_repr(self) -> str:
        """Constructor arguments shown in ``repr(module)`` (the linear layers print themselves)."""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, "
            f"vdim={self.vdim}, add_zero_attn={self.add_zero_attn}, batch_first={self.batch_first}"
        )


_PROJECTIONS = ("qlinear", "klinear", "vlinear")
_SEPARATE_WEIGHTS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
_SEQUENCE_BIASES = (("bias_k", "seq_bias_k"), ("bias_v", "seq_bias_v"))


def _as_saved(parts, shape=None):
    """One saved tensor made of ``parts`` (concatenated on dim 0, or one part viewed as ``shape``).

    With ``state_dict(keep_vars=True)`` the parts are parameters: the result is then a detached
    leaf that carries the parts' gradients too, so gradients compare key by key with
    ``nn.MultiheadAttention``'s (whose ``in_proj_weight`` is one parameter).
    """
    value = (
        torch.cat([t.detach() for t in parts]) if shape is None else parts[0].detach().view(shape)
    )
    if any(t.requires_grad for t in parts):
        value.requires_grad_(True)
        grads = [t.grad for t in parts]
        if all(g is not None for g in grads):
            value.grad = torch.cat(grads) if shape is None else grads[0].view(shape)
    return value


def _save_as_torch_mha(module, state_dict, prefix, local_metadata):
    """State-dict post-hook: rewrite our entries into nn.MultiheadAttention's, in place.

    Runs at every depth right after this layer's entries were appended (they are the last ones),
    so popping and re-inserting them in torch's order keeps their place in a parent's dict.
    """
    e = module.embed_dim
    ours = [f"{p}.{kind}" for p in _PROJECTIONS for kind in ("weight", "bias")]
    ours += [f"{p}.bias" for _, p in _SEQUENCE_BIASES] + ["out_proj.weight", "out_proj.bias"]
    found = {name: state_dict.pop(prefix + name) for name in ours if prefix + name in state_dict}
    converted = {}
    weights = [found.pop(f"{p}.weight", None) for p in _PROJECTIONS]
    packed = module.kdim == e and module.vdim == e  # torch's _qkv_same_embed_dim
    if packed and all(w is not None for w in weights):
        converted["in_proj_weight"] = _as_saved(weights)
    else:  # separate weights; partial (filtered) packed dicts keep the internal names
        names = [f"{p}.weight" for p in _PROJECTIONS] if packed else _SEPARATE_WEIGHTS
        converted.update({n: w for n, w in zip(names, weights) if w is not None})
    biases = [found.pop(f"{p}.bias", None) for p in _PROJECTIONS]
    if all(b is not None for b in biases):
        converted["in_proj_bias"] = _as_saved(biases)
    else:  # partial (filtered) dicts keep what they have, under the internal names
        converted.update({f"{p}.bias": b for p, b in zip(_PROJECTIONS, biases) if b is not None})
    for torch_name, seq in _SEQUENCE_BIASES:
        bias = found.pop(f"{seq}.bias", None)
        if bias is not None:
            converted[torch_name] = _as_saved([bias], (1, 1, e))
    converted.update(found)  # out_proj.weight / out_proj.bias: already torch's names
    for name, value in converted.items():
        state_dict[prefix + name] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # the internal submodules are not part of the saved format
        for child in _PROJECTIONS + tuple(seq for _, seq in _SEQUENCE_BIASES) + ("dropout",):
            metadata.pop(prefix + child, None)


def _load_from_torch_mha(
    module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
):
    """Load-state-dict pre-hook: rewrite nn.MultiheadAttention keys into ours, in place.

    Runs for direct and nested loads, so a checkpoint of a model built with
    nn.MultiheadAttention loads into the same model after ``ModuleValidator.fix``. Keys already
    in the internal format pass through unchanged.
    """
    keys = _TorchMhaKeys(module.embed_dim, state_dict, prefix, errors)
    e = module.embed_dim
    keys.split_packed(
        "in_proj_weight",
        "weight",
        lambda w: w.dim() == 2 and w.shape[0] == 3 * e,
        f"({3 * e}, {e})",
    )
    for name, ours in zip(_SEPARATE_WEIGHTS, _PROJECTIONS):
        keys.rename(name, f"{ours}.weight")
    keys.split_packed("in_proj_bias", "bias", lambda b: tuple(b.shape) == (3 * e,), f"({3 * e},)")
    for name, ours in _SEQUENCE_BIASES:
        keys.sequence_bias(name, ours)


class _TorchMhaKeys:
    """Rewrites one nn.MultiheadAttention state dict's keys (``_load_from_torch_mha``)."""

    def __init__(self, embed_dim, state_dict, prefix, errors):
        self.e = embed_dim
        self.state_dict = state_dict
        self.prefix = prefix
        self.errors = errors

    def pop(self, name):
        return self.state_dict.pop(self.prefix + name, None)

    def wrong_shape(self, name, value, expected):
        self.errors.append(
            f"DPMultiheadAttention: '{self.prefix}{name}' has shape {tuple(value.shape)}, "
            f"expected {expected} (embed_dim={self.e}); is the checkpoint from a layer with the "
            "same embed_dim, kdim and vdim?"
        )

    def rename(self, name, ours):
        value = self.pop(name)
        if value is not None:
            self.state_dict[f"{self.prefix}{ours}"] = value

    def split_packed(self, name, kind, shape_ok, expected):
        """``in_proj_*``: the q, k, v thirds go to the three projections' ``kind``."""
        packed = self.pop(name)
        if packed is None:
            return
        if not shape_ok(packed):
            self.wrong_shape(name, packed, expected)
            return
        e = self.e
        for i, ours in enumerate(_PROJECTIONS):
            self.state_dict[f"{self.prefix}{ours}.{kind}"] = packed[i * e : (i + 1) * e]

    def sequence_bias(self, name, ours):
        """``bias_k``/``bias_v`` ``(1, 1, E)``: the sequence-bias layer's ``(E,)`` bias."""
        bias = self.pop(name)
        if bias is None:
            return
        if bias.numel() != self.e:
            self.wrong_shape(name, bias, f"(1, 1, {self.e})")
        else:
            self.state_dict[f"{self.prefix}{ours}.bias"] = bias.reshape(self.e)

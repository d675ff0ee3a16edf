"""Checks that keep per-sample gradients honest: no sample mixing, no model changed after wrapping.

Per-sample gradients (and so the DP-SGD privacy guarantee, Abadi et al. 2016, Sec. 3.1) assume
that sample ``i``'s output depends on sample ``i``'s input only. A layer that mixes the samples of a
batch (BatchNorm, ``y - y.mean(0)``) breaks that silently, and so does a layer added to the model
after the hooks were installed (it has no hooks). Both checks here are cheap enough to run on the
training path: the mixing probe runs once per layer, the structure check is a tuple comparison.
"""

import logging
from itertools import chain
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch.func import vmap

from opacus.grad_sample.functorch import _without_hooks

__all__ = [
    "ModelStructure",
    "SKIP_BATCH_MIXING_CHECK_ATTR",
    "batch_mixing_mismatch",
]

logger = logging.getLogger(__name__)

# A layer (instance or class) with this attribute set to True is never probed for sample mixing.
SKIP_BATCH_MIXING_CHECK_ATTR = "_opacus_skip_batch_mixing_check"

# Rows of the batch compared by the probe: two already expose any mixing that changes them; a few
# more make a coincidence (two identical samples) unlikely at no real cost.
_PROBE_SAMPLES = 4


def _tolerance(dtype: torch.dtype) -> float:
    # Batched and single-sample kernels may sum in a different order; mixing errors are O(1)
    # relative to the output, far above these.
    return 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def batch_mixing_mismatch(
    layer: nn.Module, activations: list, output, batch_dim: int
) -> Optional[str]:
    """Compare ``layer``'s batched ``output`` with its outputs on single samples.

    ``activations`` are the layer's positional inputs with the batch on ``batch_dim`` (as the
    layer saw them). The first few samples are re-run one at a time (``vmap`` over a batch of one,
    no module hooks, no autograd graph). Returns a description of the mismatch, or None when the
    outputs agree or the probe cannot run: a random forward (dropout) cannot be reproduced under
    ``vmap`` and is skipped here (the functorch fallback itself refuses random forwards), as are
    non-tensor outputs and forwards ``vmap`` cannot trace (the fallback raises on those itself).
    """
    if not torch.is_tensor(output) or output.dim() <= batch_dim:
        return None
    k = min(output.shape[batch_dim], _PROBE_SAMPLES)
    batched = [
        torch.is_tensor(a) and a.dim() > batch_dim and a.shape[batch_dim] == output.shape[batch_dim]
        for a in activations
    ]
    inputs = [a.narrow(batch_dim, 0, k) if b else a for a, b in zip(activations, batched)]
    in_dims = tuple(batch_dim if b else None for b in batched)
    clone = _without_hooks(layer)

    def one_sample(*xs):
        return clone(*(x.unsqueeze(batch_dim) if b else x for x, b in zip(xs, batched)))

    try:
        with torch.no_grad():
            single = vmap(one_sample, in_dims=in_dims, out_dims=batch_dim)(*inputs)
    except Exception as err:  # noqa: BLE001  (the probe must never add a failure of its own)
        logger.debug("batch-mixing probe skipped for %s: %s", type(layer).__name__, err)
        return None
    expected = output.detach().narrow(batch_dim, 0, k)
    # ``single`` has the sample's own batch dimension of size 1 right after the vmapped one.
    if single.dim() == expected.dim() + 1 and single.shape[batch_dim + 1] == 1:
        single = single.squeeze(batch_dim + 1)
    if single.shape != expected.shape:
        return (
            f"a single sample gives an output of shape {tuple(single.shape[batch_dim + 1:])} "
            f"but the batched output has shape {tuple(output.shape)}"
        )
    if not expected.is_floating_point() and not expected.is_complex():
        same = torch.equal(single, expected)
        worst = 0.0 if same else float("nan")
    else:
        single, expected = single.double(), expected.double()
        rtol = _tolerance(output.dtype)
        atol = rtol * max(expected.abs().max().item(), 1e-6)
        same = torch.allclose(single, expected, rtol=rtol, atol=atol)
        worst = (single - expected).abs().max().item()
    if same:
        return None
    return (
        f"on its first {k} samples, the batched output differs from the output of each sample run "
        f"alone by up to {worst:.3g}"
    )


def _walk(root: nn.Module) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """ids of every module (breadth first, repeats kept) and of every parameter they own."""
    # Plain list growth and C-level ``extend``/``map``: this runs before every forward.
    modules = [root]
    i = 0
    while i < len(modules):
        m = modules[i]
        i += 1
        if m is not None:
            modules.extend(m._modules.values())
    params = chain.from_iterable([m._parameters.values() for m in modules if m is not None])
    return tuple(map(id, modules)), tuple(map(id, params))


class ModelStructure:
    """Fingerprint of a model's structure at wrap time, checked cheaply at every forward.

    The fingerprint is the tuple of ids of every submodule and of every parameter object (the
    recorded modules are kept alive here, so no id can be recycled for a new object). ``check``
    rebuilds both tuples (one walk over ``_modules``: tens of microseconds for 100 layers) and,
    only if they differ, works out what changed: modules added, removed or replaced, parameters
    added or replaced, or trainable parameters that were frozen at wrap time. The new pieces have
    no hooks (and may mix samples, e.g. BatchNorm); hooks left on removed layers capture nothing.

    ``requires_grad`` flags are not read on every forward (reading 200 flags costs more than the
    rest of the walk): a parameter unfrozen after wrapping is reported when another change is, and
    otherwise either belongs to a hooked layer (whose sampler reads ``requires_grad`` at backward
    time, so its per-sample gradient is right) or gets no ``grad_sample``, which the optimizer
    refuses. Freezing parameters is always allowed.
    """

    def __init__(self, root: nn.Module):
        self._root = root
        self._named = list(root.named_modules(remove_duplicate=False))
        self._module_ids, self._param_ids = _walk(root)
        self._trainable = frozenset(id(p) for p in root.parameters() if p.requires_grad)

    def check(self, owner: str) -> None:
        """Raise ``RuntimeError`` if the model changed since the fingerprint was taken."""
        module_ids, param_ids = _walk(self._root)
        if module_ids == self._module_ids and param_ids == self._param_ids:
            return
        changes = self.describe_changes() or ["the order of submodules or parameters changed"]
        raise RuntimeError(
            f"the model wrapped by {owner} changed after it was wrapped:\n  - "
            + "\n  - ".join(changes)
            + "\nLayers or parameters added or replaced after wrapping get no per-sample gradient "
            "hooks (and may mix samples, e.g. BatchNorm), so the privacy guarantee would not hold. "
            "Make the changes before wrapping: re-run PrivacyEngine.make_private (or wrap again "
            "with GradSampleModule) on the changed model."
        )

    def describe_changes(self) -> List[str]:
        """Human-readable differences between the model now and at wrap time."""
        before = {name or "<root>": m for name, m in self._named}
        after = {
            name or "<root>": m for name, m in self._root.named_modules(remove_duplicate=False)
        }
        changes = [f"added '{n}' ({type(after[n]).__name__})" for n in after if n not in before]
        changes += [f"removed '{n}' ({type(before[n]).__name__})" for n in before if n not in after]
        changes += [
            f"replaced '{n}' ({type(before[n]).__name__} -> {type(after[n]).__name__})"
            for n in after
            if n in before and after[n] is not before[n]
        ]
        known = set(self._param_ids)
        new_modules = {n for n in after if n not in before or after[n] is not before[n]}
        for n, p in self._root.named_parameters(remove_duplicate=False):
            owner = n.rsplit(".", 1)[0] if "." in n else "<root>"
            if owner in new_modules:
                continue  # reported with its module
            if id(p) not in known:
                changes.append(f"parameter '{n}' was added or replaced")
            elif p.requires_grad and id(p) not in self._trainable:
                changes.append(f"parameter '{n}' is trainable but was frozen at wrap time")
        return changes

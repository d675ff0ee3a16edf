"""Per-sample gradients from PyTorch's expanded weights (``grad_sample_mode="ew"``).

``torch.nn.utils._per_sample_grad.call_for_per_sample_grads`` runs the model with every trainable
parameter replaced by an ``ExpandedWeight``, whose backward writes ``p.grad_sample`` for the layers
PyTorch supports (Linear, Conv, Embedding, the norms).  Unlike the hooks it does not fill
``p.grad`` and it refuses to accumulate over several backward passes (a forward while
``grad_sample`` still holds a pass raises ``ValueError``).
"""

import torch
import torch.nn as nn

from opacus.grad_sample.gsm_base import AbstractGradSampleModule

__all__ = ["AbstractGradSampleModule", "GradSampleModuleExpandedWeights"]


def _call_for_per_sample_grads():
    try:
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads
    except ImportError:
        return None
    return call_for_per_sample_grads


class GradSampleModuleExpandedWeights(AbstractGradSampleModule):
    """Wraps ``m`` so that its forward runs through PyTorch's expanded weights.

    Args:
        m: the model.
        batch_first: must be True (the batch on dim 0 of every layer input).
        loss_reduction: ``"mean"`` or ``"sum"``.

    Raises:
        NotImplementedError: this torch lacks expanded weights, or ``batch_first`` is False.
    """

    def __init__(self, m: nn.Module, *, batch_first=True, loss_reduction="mean"):
        call = _call_for_per_sample_grads()
        if call is None:
            raise NotImplementedError(
                f"grad_sample_mode='ew' needs torch.nn.utils._per_sample_grad."
                f"call_for_per_sample_grads, which torch {torch.__version__} lacks; use "
                "grad_sample_mode='hooks' instead"
            )
        if not batch_first:
            # ExpandedWeight always reads the batch size from dim 0 of a layer's input (torch sets
            # batch_first=False only inside its own RNN decompositions).
            raise NotImplementedError(
                "grad_sample_mode='ew' supports batch_first=True only: PyTorch's expanded weights "
                "read the batch from dim 0 of every layer input. Use grad_sample_mode='hooks' for "
                "(T, B, ...) inputs."
            )
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction)
        self._call_for_per_sample_grads = call

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """Run the wrapped module through torch's per-sample-gradient context (batch on dim 0 of
        ``x``), so that the next backward fills ``p.grad_sample``.

        Args:
            x: the input batch, batch on dim 0.

        Raises:
            ValueError: a parameter still holds the per-sample gradients of an earlier pass
                (gradient accumulation is not supported in this mode).
        """
        held = [
            name
            for name, p in self._module.named_parameters()
            if p.requires_grad and getattr(p, "grad_sample", None) is not None
        ]
        if held:
            # torch's expanded weights would add this pass's rows to the previous ones (samples
            # of two batches mixed); it refuses any forward then, with a less helpful error.
            raise ValueError(
                f"{type(self).__name__}: gradient accumulation is not supported in "
                f"grad_sample_mode='ew' ({held[0]} still holds the per-sample gradients of an "
                "earlier backward pass). Call optimizer.zero_grad() (or zero_grad() on this "
                "module) after every step and before any other forward, or use "
                "grad_sample_mode='hooks', which keeps one chunk per backward pass."
            )
        batch_size = x.shape[0]
        wrapped = self._call_for_per_sample_grads(
            self._module,
            batch_size=batch_size,
            loss_reduction=self.loss_reduction,
        )
        return wrapped(x, *args, **kwargs)

    def remove_hooks(self) -> None:
        """Nothing to remove: expanded weights install no hooks on the model."""

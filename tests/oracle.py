"""The one brute-force oracle for per-sample gradients, imported by every test suite.

It runs the model once per sample (a batch of one, sliced on the batch dimension) and takes
``torch.autograd.grad`` of that sample's loss: slow, obviously correct, and independent of every
hook in the library.
"""

from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_tuple(inputs: Inputs):
    return (inputs,) if torch.is_tensor(inputs) else tuple(inputs)


def sum_loss(output) -> torch.Tensor:
    """Default per-sample loss: the sum of all outputs (tuples: of every tensor in them)."""
    if torch.is_tensor(output):
        return output.sum()
    return sum(sum_loss(o) for o in output if o is not None)


def brute_force_grad_samples(
    model: nn.Module,
    inputs: Inputs,
    *,
    loss_fn: Callable = sum_loss,
    batch_dim: Union[int, Sequence[Optional[int]]] = 0,
    targets: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Per-sample gradients ``{name: (batch, *param.shape)}`` by one backward pass per sample.

    ``inputs`` is a tensor or a sequence of tensors passed positionally to ``model``;
    ``batch_dim`` is the batch dimension of each (``None`` for an argument shared by all samples,
    e.g. an attention mask without a batch dimension). ``loss_fn(output)`` (or
    ``loss_fn(output, target)`` when ``targets`` is given, with the batch on dim 0 of ``targets``)
    must return the loss of that single sample: per-sample gradients are the gradients of each
    sample's own loss, whatever reduction the batched loss uses.
    Parameters that do not influence a sample get a zero gradient.
    """
    args = _as_tuple(inputs)
    dims = [batch_dim] * len(args) if isinstance(batch_dim, int) else list(batch_dim)
    batch_size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_sample = {n: [] for n, _ in params}
    for i in range(batch_size):
        sample_args = [a if d is None else a.narrow(d, i, 1) for a, d in zip(args, dims)]
        output = model(*sample_args)
        loss = loss_fn(output) if targets is None else loss_fn(output, targets[i : i + 1])
        grads = torch.autograd.grad(
            loss, [p for _, p in params], allow_unused=True, retain_graph=False
        )
        for (n, p), g in zip(params, grads):
            per_sample[n].append(torch.zeros_like(p) if g is None else g.detach())
    return {n: torch.stack(gs) for n, gs in per_sample.items()}


def grad_samples_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: p.grad_sample}`` of a (wrapped) model's trainable params, unprefixed."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n.replace("_module.", "", 1) if n.startswith("_module.") else n] = p.grad_sample
    return out


def assert_grad_samples_close(actual: Dict, expected: Dict, atol=1e-5, rtol=1e-4):
    """Every expected name is present with the same shape and values (message names the param)."""
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for name, exp in expected.items():
        act = actual[name]
        assert act is not None, f"{name}: no grad_sample"
        assert act.shape == exp.shape, f"{name}: shape {tuple(act.shape)} != {tuple(exp.shape)}"
        torch.testing.assert_close(act, exp, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")

"""The per-call output hooks are attached without a removable handle (issue 18): hooks a user
registers on the same output tensors (and removes) must neither replace nor be replaced by
them, and tensor subclasses keep ``Tensor.register_hook``. Oracle: brute-force per-sample
gradients (tests/oracle.py)."""

import pytest
import torch
import torch.nn as nn

from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.grad_sample_module import _attach_output_hook
from tests.oracle import assert_grad_samples_close, brute_force_grad_samples, grad_samples_of


class _UserHooks(nn.Module):
    """Registers its own hooks on the first layer's output at every forward; removes one."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.seen = []
        self.wrapped = False

    def forward(self, x):
        h = self.fc1(x)
        if self.wrapped and h.requires_grad:
            removed = h.register_hook(lambda g: self.seen.append("removed"))
            h.register_hook(lambda g: self.seen.append(tuple(g.shape)))
            removed.remove()
        return self.fc2(torch.tanh(h))


@pytest.mark.parametrize("ghost", [False, True])
def test_user_hooks_on_a_hooked_output_run_beside_the_capture_hook(ghost):
    """Per-sample gradients (hooks) or their norms (ghost) still match the oracle."""
    torch.manual_seed(int(ghost))
    model = _UserHooks()
    x = torch.randn(5, 4)
    expected = brute_force_grad_samples(model, x)
    cls = GradSampleModuleFastGradientClipping if ghost else GradSampleModule
    gsm = cls(model, loss_reduction="sum")
    model.wrapped = True
    gsm(x).sum().backward()
    assert model.seen == [(5, 6)]
    if not ghost:
        assert_grad_samples_close(grad_samples_of(gsm), expected)
        return
    for name, p in model.named_parameters():
        torch.testing.assert_close(p._norm_sample, expected[name].flatten(1).norm(dim=1))


class _Tagged(torch.Tensor):
    pass


@pytest.mark.parametrize("kind", ["plain", "subclass", "leaf"])
def test_attach_output_hook_fires_once_with_the_gradient(kind):
    w = torch.randn(3, 3, requires_grad=True)
    if kind == "leaf":
        out = w
    else:
        out = torch.randn(2, 3) @ w
        if kind == "subclass":
            out = out.as_subclass(_Tagged)
    got = []
    _attach_output_hook(out, lambda g: got.append(g.clone()))
    later = []
    out.register_hook(lambda g: later.append(g.clone()))
    (out * 2.0).sum().backward()
    assert len(got) == 1 and len(later) == 1
    torch.testing.assert_close(got[0], torch.full(out.shape, 2.0))
    torch.testing.assert_close(later[0], got[0])

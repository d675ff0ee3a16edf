"""nn.RMSNorm: ghost norms and clipped sums vs the brute-force oracle; registration needs
torch >= 2.4 and is skipped (not an import error) without nn.RMSNorm."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from opacus.grad_sample.registry import CLIPPED_SUM_SAMPLERS, GRAD_SAMPLERS, NORM_SAMPLERS
from tests.oracle import brute_force_grad_samples

pytestmark = pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm needs torch >= 2.4")


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    lead=st.lists(st.integers(1, 3), max_size=2),
    normalized=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    eps=st.sampled_from([None, 1e-3, 0.5]),
    frozen=st.booleans(),
)
def test_rms_norm_norms_and_clipped_sums(batch, lead, normalized, eps, frozen):
    torch.manual_seed(0)
    layer = nn.RMSNorm(normalized, eps=eps).double()
    with torch.no_grad():
        layer.weight.normal_()
    layer.weight.requires_grad_(not frozen)
    x = torch.randn(batch, *lead, *normalized, dtype=torch.float64)
    r = torch.randn(batch, *lead, *normalized, dtype=torch.float64)
    w = torch.rand(batch, dtype=torch.float64)
    norms = NORM_SAMPLERS[nn.RMSNorm](layer, [x], r)
    sums = CLIPPED_SUM_SAMPLERS[nn.RMSNorm](layer, [x], r, w)
    if frozen:
        assert norms == {} and sums == {}
        return
    g = brute_force_grad_samples(layer, x, loss_fn=lambda out, t: (out * t).sum(), targets=r)[
        "weight"
    ]
    assert set(norms) == set(sums) == {layer.weight}
    torch.testing.assert_close(norms[layer.weight], g.reshape(batch, -1).norm(dim=1))
    torch.testing.assert_close(sums[layer.weight], torch.einsum("b,b...->...", w, g))


def test_rms_norm_registered_in_every_table():
    for table in (GRAD_SAMPLERS, NORM_SAMPLERS, CLIPPED_SUM_SAMPLERS):
        assert nn.RMSNorm in table


def test_rms_norm_ghost_clipping_end_to_end():
    """Ghost wrapper on Linear + RMSNorm: the per-sample norms are the oracle's."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Linear(6, 3)).double()
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    expected = brute_force_grad_samples(model, x, loss_fn=lambda out: out.pow(2).sum())
    ghost = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=1.0)
    assert ghost.log_module_gradient_sample_mode(model[1]) == "ghost"
    ghost(x).pow(2).sum().backward()
    want = torch.stack([g.reshape(4, -1).norm(dim=1) for g in expected.values()]).norm(dim=0)
    torch.testing.assert_close(ghost.get_norm_sample(), want)


def test_without_nn_rms_norm_the_package_still_imports():
    """torch < 2.4 has no nn.RMSNorm: importing the samplers must not fail."""
    code = (
        "import torch.nn as nn\n"
        "del nn.RMSNorm\n"
        "import opacus.grad_sample\n"
        "from opacus.grad_sample.registry import GRAD_SAMPLERS\n"
        "assert not any(c.__name__ == 'RMSNorm' for c in GRAD_SAMPLERS)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

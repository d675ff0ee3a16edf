"""The optimizer's side of the modes table (``opacus.optimizers.families``): the optimizer
factory reads it without importing ``opacus.grad_sample``, and it agrees with the grad-sample
side (``opacus.grad_sample.modes``) row by row."""

import os
import subprocess
import sys

import pytest

from opacus.grad_sample.grad_sample_module import GradSampleHooks, GradSampleModule
from opacus.grad_sample.modes import GRAD_SAMPLE_MODES, GradSampleMode, grad_sample_mode_info
from opacus.optimizers import (
    DPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
    get_optimizer_class,
)
from opacus.optimizers.families import (
    CLIPPED_SUM,
    OPTIMIZER_FAMILIES,
    PER_SAMPLE_GRADIENTS,
    optimizer_family,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_FRESH = """
import sys
import opacus.optimizers
from opacus.optimizers import get_optimizer_class

print(get_optimizer_class("flat", False, grad_sample_mode="ghost").__name__)
print(get_optimizer_class("flat", True, grad_sample_mode="ghost_fsdp").__name__)
print(get_optimizer_class("per_layer", True, grad_sample_mode="hooks").__name__)
try:
    get_optimizer_class("flat", False, grad_sample_mode="jax")
except ValueError as err:
    print(err)
print(sorted(m for m in sys.modules if m.startswith("opacus.grad_sample")))
print(opacus.__file__)
"""


def test_optimizer_factory_works_without_the_grad_sample_package():
    """A fresh interpreter: ``import opacus.optimizers`` alone answers for every mode and never
    imports ``opacus.grad_sample`` (not even deferred, inside the call)."""
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[:3] == [
        "DPOptimizerFastGradientClipping",
        "FSDPOptimizerFastGradientClipping",
        "DistributedPerLayerOptimizer",
    ]
    assert "grad_sample_mode='jax' is not a grad-sample mode" in lines[3]
    assert "ghost_fsdp" in lines[3]
    assert lines[4] == "[]"
    assert lines[5] == os.path.join(ROOT, "opacus", "__init__.py")


def test_both_sides_of_the_table_name_the_same_modes():
    assert set(OPTIMIZER_FAMILIES) == set(GRAD_SAMPLE_MODES)
    for name, mode in GRAD_SAMPLE_MODES.items():
        family = OPTIMIZER_FAMILIES[name]
        assert mode.optimizer is family
        assert (mode.per_sample, mode.clippings, mode.fsdp) == (
            family.per_sample,
            family.clippings,
            family.fsdp,
        )
        assert mode.grad_sample_before_grad == family.grad_sample_before_grad
        assert mode.clips_in_backward == (family.per_sample == CLIPPED_SUM)
        # Ghost clipping's optimizers noise the clipped sum the criterion left in p.grad.
        optim = get_optimizer_class("flat", False, name)
        assert issubclass(optim, DPOptimizerFastGradientClipping) == mode.clips_in_backward
        assert (optim is FSDPOptimizerFastGradientClipping) == mode.fsdp
    assert {f.per_sample for f in OPTIMIZER_FAMILIES.values()} == {
        PER_SAMPLE_GRADIENTS,
        CLIPPED_SUM,
    }


def test_a_mode_without_an_optimizer_family_is_refused_when_the_table_is_built():
    with pytest.raises(ValueError, match="'jax'.*OPTIMIZER_FAMILIES"):
        GradSampleMode("jax", GradSampleModule, GradSampleHooks)


@pytest.mark.parametrize("mode", ["jax", "", 3, ["ghost"]])
def test_unknown_mode_raises_the_same_error_on_both_sides(mode):
    with pytest.raises(ValueError) as from_engine:
        grad_sample_mode_info(mode)
    with pytest.raises(ValueError) as from_optimizer:
        optimizer_family(mode)
    with pytest.raises(ValueError) as from_factory:
        get_optimizer_class("flat", False, mode)
    assert str(from_engine.value) == str(from_optimizer.value) == str(from_factory.value)
    assert f"grad_sample_mode={mode!r} is not a grad-sample mode" in str(from_factory.value)


def test_none_means_hooks():
    assert optimizer_family(None) is OPTIMIZER_FAMILIES["hooks"]
    assert get_optimizer_class("per_layer", True, None).__name__ == "DistributedPerLayerOptimizer"
    with pytest.raises(ValueError, match="grad_sample_mode='hooks'"):
        get_optimizer_class("fancy", False, None)

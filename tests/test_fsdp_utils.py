"""``opacus.utils.fsdp_utils``: module walking, and FSDP2 sharding on CPU with gloo."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from opacus.utils import fsdp_utils
from opacus.utils.fsdp_utils import (
    FSDP2Wrapper,
    GradSampleModuleFastGradientClippingFSDP,
    has_params,
    has_trainable_params,
    iterate_submodules,
)
from tests.optimizers.dp_reference import cpu_mesh

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available() or not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch without FSDP2 (fully_shard)", allow_module_level=True)


def _nested():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    return nn.Sequential(nn.Linear(5, 3), inner, frozen, nn.ReLU(), nn.Linear(4, 2))


def test_reexports():
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
        GradSampleModuleFastGradientClippingFSDP as Original,
    )
    from opacus.utils.module_utils import has_trainable_params as original_has_trainable

    assert GradSampleModuleFastGradientClippingFSDP is Original
    assert has_trainable_params is original_has_trainable


def test_has_params_means_direct_parameters():
    model = _nested()
    assert not has_params(model)  # a container owns none itself
    assert has_params(model[0]) and has_params(model[2])
    assert not has_params(model[3])
    assert has_trainable_params(model) and not has_trainable_params(model[2])


def test_iterate_submodules_is_post_order_without_root():
    model = _nested()
    order = list(iterate_submodules(model))
    expected = [m for name, m in model.named_modules() if name]
    assert len(order) == len(expected) and {id(m) for m in order} == {id(m) for m in expected}
    position = {id(m): i for i, m in enumerate(order)}
    for parent in order:
        for child in parent.children():
            assert position[id(child)] < position[id(parent)]
    assert model not in order


def test_wrapper_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        FSDP2Wrapper(_nested())


def _grads_unsharded(model, xs):
    model.zero_grad()
    loss = torch.stack([model(x).pow(2).mean() for x in xs]).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, world_size, init_file, result_file):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        from torch.distributed.fsdp import FSDPModule

        model = _nested()
        reference = _nested()
        xs = [
            torch.randn(6, 5, generator=torch.Generator().manual_seed(r)) for r in range(world_size)
        ]
        wrapped = FSDP2Wrapper(model, mesh=cpu_mesh(world_size))
        assert wrapped is model and isinstance(model, FSDPModule)
        sharded = {name for name, m in model.named_modules() if name and isinstance(m, FSDPModule)}
        out = model(xs[rank]).pow(2).mean()
        out.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        expected = _grads_unsharded(reference, xs)  # FSDP averages the ranks' gradients
        if rank == 0:
            torch.save({"sharded": sharded, "grads": grads, "expected": expected}, result_file)
        # leave together: gloo can abort a rank whose peer tears down first
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(world_size):
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.pt")
        if world_size == 1:
            if dist.is_initialized():
                pytest.skip("a process group is already initialised in this process")
            _worker(0, 1, init_file, result_file)
        else:
            mp.spawn(_worker, args=(world_size, init_file, result_file), nprocs=world_size)
        return torch.load(result_file)


def _check(result):
    # Layers owning trainable parameters are FSDP units; the frozen layer and ReLU are not.
    assert result["sharded"] == {"0", "1.0", "1.2", "4"}
    assert result["grads"].keys() == result["expected"].keys()
    for name, grad in result["grads"].items():
        torch.testing.assert_close(grad, result["expected"][name], msg=name)


def test_fsdp2_wrapper_one_rank():
    _check(_run(1))


@pytest.mark.slow
def test_fsdp2_wrapper_two_ranks_matches_unsharded_gradients():
    _check(_run(2))


def test_module_exports():
    assert set(fsdp_utils.__all__) >= {
        "FSDP2Wrapper",
        "GradSampleModuleFastGradientClippingFSDP",
        "has_params",
        "has_trainable_params",
        "iterate_submodules",
    }

"""PrivacyEngine.save_checkpoint / load_checkpoint round-trip exactly.

DP settings (noise multiplier, clipping bound, ...) are not part of the optimizer's checkpoint
(Opacus 1.6): loading leaves the target optimizer's own settings in place.
"""

import io
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine
from opacus.schedulers import ExponentialNoise, StepGradClip
from opacus.utils.module_utils import are_state_dict_equal


def _setup(seed, noise_seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    g = torch.Generator().manual_seed(123)
    data = TensorDataset(torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g))
    engine = PrivacyEngine(accountant="rdp")
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        data_loader=DataLoader(data, batch_size=10),
        noise_multiplier=1.3,
        max_grad_norm=1.5,
        noise_generator=torch.Generator().manual_seed(noise_seed),
    )
    noise_sched = ExponentialNoise(opt, gamma=0.9)
    clip_sched = StepGradClip(opt, step_size=2, gamma=0.5)
    return engine, model, opt, dl, noise_sched, clip_sched


def _train(model, opt, dl, noise_sched, clip_sched, epochs=2):
    for _ in range(epochs):
        for x, y in dl:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        noise_sched.step()
        clip_sched.step()


def _optimizer_states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa.keys() == sb.keys()
    for k in sa["state"]:
        assert are_state_dict_equal(sa["state"][k], sb["state"][k])
    return True


@pytest.mark.parametrize("to_buffer", [False, True])
def test_round_trip(tmp_path, to_buffer):
    engine, model, opt, dl, ns, cs = _setup(seed=0)
    _train(model, opt, dl, ns, cs)
    target = io.BytesIO() if to_buffer else tmp_path / "ckpt.pt"
    engine.save_checkpoint(
        path=target,
        module=model,
        optimizer=opt,
        noise_scheduler=ns,
        grad_clip_scheduler=cs,
        checkpoint_dict={"epoch": 2, "note": "hello"},
    )
    if to_buffer:
        target.seek(0)

    engine2, model2, opt2, _, ns2, cs2 = _setup(seed=1)
    assert not are_state_dict_equal(model.state_dict(), model2.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything saved is restored: nothing to report
        loaded = engine2.load_checkpoint(
            path=target,
            module=model2,
            optimizer=opt2,
            noise_scheduler=ns2,
            grad_clip_scheduler=cs2,
        )
    assert loaded["epoch"] == 2 and loaded["note"] == "hello"  # the whole loaded dict
    assert are_state_dict_equal(loaded["module_state_dict"], model.state_dict())
    assert are_state_dict_equal(model.state_dict(), model2.state_dict())
    assert _optimizer_states_equal(opt, opt2)
    assert engine2.accountant.history == engine.accountant.history
    assert engine2.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    assert ns2.state_dict() == ns.state_dict() and cs2.state_dict() == cs.state_dict()
    # The DP settings stay the loading optimizer's own (the schedulers moved opt's).
    assert opt2.noise_multiplier == 1.3 != opt.noise_multiplier
    assert opt2.max_grad_norm == 1.5 != opt.max_grad_norm

    # With the same DP settings, training on from the checkpoint gives what training on
    # without it gives.
    opt2.noise_multiplier, opt2.max_grad_norm = opt.noise_multiplier, opt.max_grad_norm
    opt.generator = torch.Generator().manual_seed(9)
    opt2.generator = torch.Generator().manual_seed(9)
    x, y = next(iter(DataLoader(dl.dataset, batch_size=8)))
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kwargs_pass_through_and_partial_checkpoints(tmp_path):
    engine, model, opt, dl, ns, cs = _setup(seed=0)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(
        path=path,
        module=model,
        torch_save_kwargs={"pickle_protocol": 2},
        module_state_dict_kwargs={"prefix": "p."},
    )
    engine2, model2, opt2, *_ = _setup(seed=1)
    with pytest.raises(RuntimeError):  # the prefixed keys do not match without strict=False
        engine2.load_checkpoint(path=path, module=model2)
    engine2.load_checkpoint(
        path=path,
        module=model2,
        module_load_dict_kwargs={"strict": False},
        torch_load_kwargs={"map_location": "cpu"},
    )
    with pytest.warns(UserWarning, match="optimizer was given but the checkpoint holds no"):
        engine2.load_checkpoint(
            path=path, module=model2, optimizer=opt2, module_load_dict_kwargs={"strict": False}
        )
    assert opt2.state_dict()["state"] == {}  # left as it was (never stepped)


def test_optimizer_state_without_optimizer_warns(tmp_path):
    engine, model, opt, dl, ns, cs = _setup(seed=0)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=opt, noise_scheduler=ns)
    engine2, model2, *_ = _setup(seed=1)
    with pytest.warns(UserWarning, match="holds optimizer state but no optimizer was given"):
        loaded = engine2.load_checkpoint(path=path, module=model2)
    assert "optimizer_state_dict" in loaded
    assert are_state_dict_equal(model.state_dict(), model2.state_dict())

"""The per-model caches of ghost clipping's hooks (``_per_structure``) and the lighter per-step
paths, checked against the brute-force per-sample oracle at every invalidation point:
parameters frozen / unfrozen between steps, modules or parameters added or replaced after
wrapping, hooks removed, ``train()`` / ``eval()``."""

import pytest
import torch
import torch.nn as nn

from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from tests.oracle import brute_force_grad_samples

C = 0.5


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _wrap(model):
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=C, loss_reduction="sum")
    params = [p for p in gsm.parameters()]
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=None,
        loss_reduction="sum",
    )
    crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), loss_reduction="sum")
    return gsm, opt, crit


def _batch(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _ids(params):
    return [id(p) for p in params]


def _oracle_clipped_sum(model, x, y):
    """``sum_i min(1, C / (||g_i|| + 1e-6)) g_i`` over the trainable parameters."""
    ce = nn.CrossEntropyLoss(reduction="sum")
    gs = brute_force_grad_samples(model, x, loss_fn=ce, targets=y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in gs.values()], dim=1).norm(dim=1)
    coef = (C / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("i,i...->...", coef, g) for n, g in gs.items()}


def _step_and_check(gsm, opt, crit, model, seed=1):
    x, y = _batch(seed=seed)
    crit(gsm(x), y).backward()
    expected = _oracle_clipped_sum(model, x, y)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-5, rtol=1e-4)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    opt.step()
    opt.zero_grad(set_to_none=True)


def _record_book_keeping(gsm) -> list:
    planned = []
    plan = gsm.plan_book_keeping

    def recording():
        planned.append(plan())
        return planned[-1]

    gsm.plan_book_keeping = recording
    return planned


def test_freezing_and_unfreezing_between_steps_matches_oracle():
    model = _model()
    gsm, opt, crit = _wrap(model)
    planned = _record_book_keeping(gsm)
    _step_and_check(gsm, opt, crit, model, seed=1)
    # A cache holding requires_grad would keep model[2].weight in the trainable list: book-
    # keeping would find it uncovered and refuse, or its p.grad would be set.
    model[2].weight.requires_grad_(False)
    _step_and_check(gsm, opt, crit, model, seed=2)
    model[2].weight.requires_grad_(True)
    model[0].bias.requires_grad_(False)
    _step_and_check(gsm, opt, crit, model, seed=3)
    model[0].bias.requires_grad_(True)
    _step_and_check(gsm, opt, crit, model, seed=4)
    # Every step kept the one-pass book-keeping: a trainable list cached with its
    # requires_grad flags would name the frozen weight, which no layer then covers.
    assert planned == [True] * 4


def test_the_cached_lists_are_the_models_and_filter_requires_grad_at_use():
    model = _model()
    gsm, _, _ = _wrap(model)
    assert _ids(gsm.clipped_parameters()) == _ids(model.parameters())
    assert _ids(gsm._model_parameters()) == _ids(model.parameters())
    assert gsm._model_parameters() is gsm._model_parameters()  # listed once
    model[4].weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert _ids(gsm.clipped_parameters()) == _ids(trainable)
    assert id(model[4].weight) not in _ids(gsm.clipped_parameters())


def test_a_module_added_after_wrapping_is_refused_not_silently_missed():
    model = _model()
    gsm, opt, crit = _wrap(model)
    _step_and_check(gsm, opt, crit, model)
    model.add_module("extra", nn.Linear(3, 3))
    x, y = _batch()
    with pytest.raises(RuntimeError, match="changed after it was wrapped"):
        gsm(x)


def test_a_parameter_replaced_after_wrapping_is_refused():
    model = _model()
    gsm, opt, crit = _wrap(model)
    _step_and_check(gsm, opt, crit, model)
    model[2].weight = nn.Parameter(torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="changed after it was wrapped"):
        gsm(_batch()[0])


def test_the_caches_follow_a_new_structure_after_the_hooks_are_reinstalled():
    model = _model()
    gsm, _, _ = _wrap(model)
    assert gsm.unhooked_parameters() == []
    first = gsm._model_parameters()
    gsm.remove_hooks()
    # No hooks: nothing is measured, so every trainable parameter is unhooked (a stale cache
    # of the hooked layers would report none).
    assert _ids(gsm.unhooked_parameters()) == _ids(model.parameters())
    model.add_module("extra", nn.Linear(3, 3))
    gsm.add_hooks(loss_reduction="sum")
    assert gsm._model_parameters() is not first
    assert _ids(gsm._model_parameters()) == _ids(model.parameters())
    assert gsm.unhooked_parameters() == []


def test_a_model_rewrapped_after_cleanup_steps_like_the_oracle():
    model = _model()
    gsm, opt, crit = _wrap(model)
    _step_and_check(gsm, opt, crit, model, seed=1)
    gsm.to_standard_module()
    model.add_module("extra", nn.Linear(3, 3))  # run last by the Sequential
    gsm2, opt2, crit2 = _wrap(model)
    _step_and_check(gsm2, opt2, crit2, model, seed=2)


def test_train_eval_switches_between_steps_match_oracle():
    model = _model()
    gsm, opt, crit = _wrap(model)
    _step_and_check(gsm, opt, crit, model, seed=1)
    gsm.eval()
    with torch.no_grad():
        gsm(_batch(seed=9)[0])  # evaluation: nothing captured
    gsm(_batch(seed=9)[0])  # an eval forward with gradients on captures nothing either
    gsm.train()
    _step_and_check(gsm, opt, crit, model, seed=2)


def test_wrapper_attribute_writes_still_register_modules_parameters_and_buffers():
    gsm, _, _ = _wrap(_model())
    gsm.plain = 1
    gsm.plain = 2
    assert gsm.__dict__["plain"] == 2
    gsm.plain = nn.Linear(2, 2)  # a module under a name held by a plain value: registered
    assert "plain" in gsm._modules and "plain" not in gsm.__dict__
    gsm.other = None
    gsm.other = nn.Parameter(torch.ones(2))
    assert "other" in gsm._parameters and "other" not in gsm.__dict__
    gsm.third = nn.Buffer(torch.ones(2))
    assert "third" in gsm._buffers and "third" not in gsm.__dict__
    gsm.third = torch.zeros(2)  # a buffer's name: stays a buffer
    assert torch.equal(gsm._buffers["third"], torch.zeros(2)) and "third" not in gsm.__dict__
    # Exactly nn.Module's outcome where a plain attribute's name gets a Buffer.
    for target in (gsm, nn.Module()):
        target.fourth = 0
        with pytest.raises(KeyError, match="already exists"):
            target.fourth = nn.Buffer(torch.ones(2))


@pytest.mark.parametrize("n_layers", [4, 64])
def test_a_step_walks_the_model_a_constant_number_of_times(monkeypatch, n_layers):
    """A ghost step does not walk the whole model (listed once per wrapping); its per-layer
    work stays linear in the number of layers."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n_layers)])
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=C)
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=4,
    )
    crit = DPLossFastGradientClipping(gsm, opt, lambda o, t: (o - t).pow(2).sum(dim=1))
    x, t = torch.randn(4, 4), torch.randn(4, 4)

    def step():
        crit(gsm(x), t).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    calls = []
    original = nn.Module.parameters

    def counting(self, recurse=True):
        calls.append(self)
        return original(self, recurse)

    monkeypatch.setattr(nn.Module, "parameters", counting)
    step()
    step()
    monkeypatch.setattr(nn.Module, "parameters", original)
    # No walk of the whole model (it is listed once per wrapping); at most one look at each
    # layer's own parameters per forward (the capture hook's requires_grad check).
    assert not any(c is model or c is gsm for c in calls)
    assert len(calls) <= 2 * n_layers


class _TwoSaved(nn.Module):
    """Two tensors the graph saves beyond the captured input and the parameters: ``h`` (by
    ``h * h``, 6 x 8 floats) and ``tanh(h*h)`` (by tanh's backward, 6 x 8 floats)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x):
        h = self.fc(x)
        return torch.tanh(h * h)


def test_the_memory_walk_stops_once_enough_bytes_are_found():
    torch.manual_seed(5)
    gsm = GradSampleModuleFastGradientClipping(_TwoSaved())
    out = gsm(torch.randn(6, 4))
    gsm.norm_pass_root = out.sum(dim=1).grad_fn
    full = gsm.graph_bytes_beyond_activations()
    assert full == 2 * 6 * 8 * 4  # brute force: h and tanh(h*h), float32
    assert gsm.graph_bytes_beyond_activations(enough=full + 1) == full  # never enough: all
    early = gsm.graph_bytes_beyond_activations(enough=1)
    assert 1 <= early < full  # stopped after the first saved tensor
    for enough in (1, full // 2, full):
        # The caller's comparison is the one the full walk gives.
        assert (gsm.graph_bytes_beyond_activations(enough=enough) >= enough) == (full >= enough)

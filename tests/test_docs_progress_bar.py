"""The examples' progress bar shows the ε spent so far, not the previous epoch's (issue 21)."""

import importlib.util
import os

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _common():
    spec = importlib.util.spec_from_file_location(
        "examples_common", os.path.join(ROOT, "examples", "_common.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeBar:
    """Stands in for tqdm: iterates and records every postfix."""

    def __init__(self, iterable):
        self.iterable, self.postfixes, self.n = iterable, [], 0
        self.total = len(iterable)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1

    def set_postfix(self, **kwargs):
        self.postfixes.append(kwargs)


def test_train_epoch_bar_ends_on_the_epsilon_after_the_last_step(monkeypatch):
    common = _common()
    bars = []
    monkeypatch.setattr(
        common, "progress", lambda it, desc, on: bars.append(FakeBar(it)) or bars[-1]
    )
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(12, 3), torch.randint(0, 2, (12,))), batch_size=4)
    steps_taken = []
    original = common.sgd_step

    def counting_step(*args):
        steps_taken.append(1)
        return original(*args)

    monkeypatch.setattr(common, "sgd_step", counting_step)
    eps = lambda: 0.5 * len(steps_taken)  # noqa: E731 (ε grows with every step)
    _, steps = common.train_epoch(
        model,
        optimizer,
        nn.CrossEntropyLoss(),
        loader,
        desc="e",
        show_bar=True,
        eps=eps,
        steps=0,
        max_steps=None,
    )
    assert steps == 3
    # the last postfix is the ε after all three steps (1.50), not the one at the epoch start
    assert bars[0].postfixes[-1]["eps"] == "1.50"
    # a number is shown as it is
    common.train_epoch(
        model,
        optimizer,
        nn.CrossEntropyLoss(),
        loader,
        desc="e",
        show_bar=True,
        eps=7.0,
        steps=0,
        max_steps=None,
    )
    assert {p["eps"] for p in bars[1].postfixes} == {"7.00"}


def test_show_batch_asks_a_callable_on_the_last_batch():
    common = _common()
    bar = FakeBar([0, 1, 2])
    value = [0.0]
    out, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    for _ in bar:
        value[0] += 1.0
        common.show_batch(bar, torch.tensor(0.3), out, y, lambda: value[0])
    assert bar.postfixes[-1]["eps"] == "3.00"

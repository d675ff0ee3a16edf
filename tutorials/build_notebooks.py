#!/usr/bin/env python
"""Writes the tutorial notebooks from the cell sources below and executes them in place.

    python tutorials/build_notebooks.py            # full settings (what is committed)
    OPACUS_TUTORIAL_FAST=1 python tutorials/build_notebooks.py --no-execute   # sources only

Keeping the sources here (not only in the .ipynb JSON) makes them reviewable and diffable; the
committed notebooks carry the outputs of a full run. Needs ``nbformat``, and ``nbclient`` with
``ipykernel`` to execute.
"""

import argparse
import os

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = """import os
import time

import numpy as np
import torch
import torch.nn as nn

# OPACUS_TUTORIAL_FAST=1 (set by the tests) shortens every training run.
FAST = os.environ.get("OPACUS_TUTORIAL_FAST") == "1"
torch.set_num_threads(1)  # these models are tiny: more threads only add overhead
torch.manual_seed(0)
print("fast mode" if FAST else "full mode")"""

IMAGE = [
    (
        "md",
        """# Building a differentially private image classifier

This tutorial trains a small convolutional network on the 8x8 handwritten digits that ship with
scikit-learn, first without privacy, then with DP-SGD through `PrivacyEngine`. Along the way:

1. making a model DP-compatible with `ModuleValidator` (BatchNorm is not);
2. `make_private` and what it returns;
3. virtual batches with `BatchMemoryManager`;
4. asking for a target ε with `make_private_with_epsilon`;
5. the privacy–utility trade-off.

Set `OPACUS_TUTORIAL_FAST=1` to run everything with a couple of epochs.""",
    ),
    ("code", SETUP),
    ("md", "## The data\n\n1797 grey-scale 8x8 images, 10 classes; we keep 20% for testing."),
    (
        "code",
        """from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
x = (x - 0.5) / 0.5
y = torch.tensor(digits.target)
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
x, y = x[perm], y[perm]
n_test = len(y) // 5
train_set = TensorDataset(x[n_test:], y[n_test:])
test_set = TensorDataset(x[:n_test], y[:n_test])
print(f"train {len(train_set)}, test {len(test_set)}, image shape {tuple(x.shape[1:])}")""",
    ),
    (
        "md",
        """## A model, and why BatchNorm has to go

A typical CNN uses `nn.BatchNorm2d`. Its output for one image depends on the other images of
the batch, so one example's gradient is no longer its own, and clipping it does not bound that
example's influence. `ModuleValidator` lists such problems, and `fix` replaces BatchNorm by
GroupNorm (which normalises each example on its own).""",
    ),
    (
        "code",
        """from opacus.validators import ModuleValidator


def make_model():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10),
    )


model = make_model()
for error in ModuleValidator.validate(model, strict=False):
    print("unsupported:", error)
model = ModuleValidator.fix(model)
print("after fix:", model[1])
print("valid now:", ModuleValidator.is_valid(model))""",
    ),
    ("md", "## A non-private baseline"),
    (
        "code",
        """EPOCHS = 2 if FAST else 10


def evaluate(model, loader=DataLoader(test_set, batch_size=256)):
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in loader)
    model.train()
    return correct / len(test_set)


def train(model, optimizer, loader, epochs, privacy_engine=None, delta=1e-5):
    criterion = nn.CrossEntropyLoss()
    for epoch in range(1, epochs + 1):
        for xb, yb in loader:
            optimizer.zero_grad()
            out = model(xb)
            loss = criterion(out, yb) if len(yb) else out.sum() * 0.0  # empty Poisson batch
            loss.backward()
            optimizer.step()
        eps = privacy_engine.get_epsilon(delta) if privacy_engine else float("inf")
        if epoch == epochs or epoch % 5 == 0:
            print(f"epoch {epoch:2d}: test accuracy {evaluate(model):.3f}, eps {eps:.2f}")
    return evaluate(model), eps


torch.manual_seed(0)
baseline = ModuleValidator.fix(make_model())
start = time.time()
baseline_acc, _ = train(baseline, torch.optim.SGD(baseline.parameters(), lr=0.2),
                        DataLoader(train_set, batch_size=64, shuffle=True), EPOCHS)
print(f"non-private: {baseline_acc:.3f} in {time.time() - start:.1f}s")""",
    ),
    (
        "md",
        """## DP-SGD with `make_private`

`make_private` returns three new objects:

- the model, wrapped in a `GradSampleModule` whose hooks compute per-example gradients;
- a `DPOptimizer` that clips each example's gradient to `max_grad_norm`, sums them, adds
  Gaussian noise of std `noise_multiplier * max_grad_norm` and divides by the expected batch
  size before the SGD step;
- a data loader that draws Poisson batches (each example with probability 64/1438).

Clipping shrinks the gradients, so DP-SGD usually wants a larger learning rate.""",
    ),
    (
        "code",
        """from opacus import PrivacyEngine

torch.manual_seed(0)
model = ModuleValidator.fix(make_model())
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
privacy_engine = PrivacyEngine(accountant="prv")
model, optimizer, train_loader = privacy_engine.make_private(
    module=model,
    optimizer=optimizer,
    data_loader=DataLoader(train_set, batch_size=64, shuffle=True),
    noise_multiplier=1.0,
    max_grad_norm=1.0,
)
print(type(model).__name__, type(optimizer).__name__, type(train_loader).__name__)
print("sample rate", 1 / len(train_loader), "expected batch size", optimizer.expected_batch_size)
start = time.time()
dp_acc, dp_eps = train(model, optimizer, train_loader, EPOCHS, privacy_engine)
print(f"DP-SGD: {dp_acc:.3f} at eps {dp_eps:.2f} (delta 1e-5) in {time.time() - start:.1f}s")""",
    ),
    (
        "md",
        """## Virtual batches

Per-example gradients cost `batch_size` times the memory of ordinary gradients.
`BatchMemoryManager` feeds the model physical batches of at most `max_physical_batch_size`
examples, and the optimizer only takes its (noisy) step at the end of each logical batch. The
result is the same DP-SGD; only the peak memory changes.""",
    ),
    (
        "code",
        """from opacus.utils.batch_memory_manager import BatchMemoryManager

torch.manual_seed(0)
model = ModuleValidator.fix(make_model())
privacy_engine = PrivacyEngine(accountant="prv")
model, optimizer, train_loader = privacy_engine.make_private(
    # 4x the batch: the noise is 4x smaller relative to the clipped sum, so a larger lr
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=2.0),
    data_loader=DataLoader(train_set, batch_size=256), noise_multiplier=1.5, max_grad_norm=1.0,
)
criterion = nn.CrossEntropyLoss()
physical_sizes = []
for epoch in range(EPOCHS):
    with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=32,
                            optimizer=optimizer) as physical_loader:
        for xb, yb in physical_loader:
            physical_sizes.append(len(yb))
            optimizer.zero_grad()
            out = model(xb)
            (criterion(out, yb) if len(yb) else out.sum() * 0.0).backward()
            optimizer.step()
print(f"{len(physical_sizes)} physical batches of at most {max(physical_sizes)} examples; "
      f"the accountant counted {privacy_engine.accountant.history} (sigma, q, logical steps)")
print(f"test accuracy {evaluate(model):.3f} at eps {privacy_engine.get_epsilon(1e-5):.2f}")""",
    ),
    (
        "md",
        """## Asking for a target ε

`make_private_with_epsilon` searches the smallest noise multiplier that spends at most
`target_epsilon` over the planned number of epochs.""",
    ),
    (
        "code",
        """torch.manual_seed(0)
model = ModuleValidator.fix(make_model())
privacy_engine = PrivacyEngine(accountant="prv")
model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
    data_loader=DataLoader(train_set, batch_size=64), target_epsilon=2.0, target_delta=1e-5,
    epochs=EPOCHS, max_grad_norm=1.0,
)
print(f"noise multiplier chosen: {optimizer.noise_multiplier:.3f}")
acc, eps = train(model, optimizer, train_loader, EPOCHS, privacy_engine)
print(f"target eps 2.0 -> spent {eps:.2f}, test accuracy {acc:.3f}")""",
    ),
    (
        "md",
        """## The privacy–utility trade-off

More noise, less ε, less accuracy. (`examples/privacy_utility_plot.py` draws this curve.)""",
    ),
    (
        "code",
        """rows = []
for sigma in ([0.8, 2.0] if FAST else [0.5, 0.8, 1.2, 2.5]):
    torch.manual_seed(0)
    model = ModuleValidator.fix(make_model())
    privacy_engine = PrivacyEngine(accountant="prv")
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(train_set, batch_size=64), noise_multiplier=sigma,
        max_grad_norm=1.0,
    )
    acc, eps = train(model, optimizer, train_loader, EPOCHS, privacy_engine)
    rows.append((sigma, eps, acc))
print(f"{'sigma':>6} {'eps':>7} {'accuracy':>9}")
for sigma, eps, acc in rows:
    print(f"{sigma:6.1f} {eps:7.2f} {acc:9.3f}")
print(f"{'-':>6} {'inf':>7} {baseline_acc:9.3f}  (non-private)")""",
    ),
    (
        "code",
        """import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(5, 3.2))
ax.plot([eps for _, eps, _ in rows], [acc for _, _, acc in rows], "o-", label="DP-SGD")
for sigma, eps, acc in rows:
    ax.annotate(f"σ={sigma}", (eps, acc), textcoords="offset points", xytext=(4, -10))
ax.axhline(baseline_acc, color="grey", linestyle="--", label="non-private")
ax.set_xlabel("ε (δ = 1e-5, PRV accountant)")
ax.set_ylabel("test accuracy")
ax.set_title("Privacy–utility trade-off on the digits")
ax.legend(loc="lower right")
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        """## Take-aways

- Fix the model first (`ModuleValidator.fix`), then create the optimizer.
- Use the objects `make_private` returns; train as usual.
- Report ε together with δ, the accountant, and the sampling rate and steps that produced it.""",
    ),
]

TEXT = [
    (
        "md",
        """# Building a private text classifier with `DPMultiheadAttention`

Attention layers need a DP version: `nn.MultiheadAttention` fuses its projections in a way the
per-example gradient hooks cannot see, so `opacus.layers.DPMultiheadAttention` rebuilds it from
plain `nn.Linear` layers. In Opacus 1.6, `DPMultiheadAttention(batch_first=True)` transposed its
input to sequence-first *before* those linear layers, so with `make_private(batch_first=True)`
their "per-example" gradients were per-*position*: training crashed next to an ordinary
`nn.Linear`, or silently mixed examples. This tutorial checks the fixed layer and trains a small
transformer with it, on the topic-labelled sentences shipped in `examples/data/sentences.tsv`.""",
    ),
    ("code", SETUP),
    (
        "md",
        """## 1. The same outputs as `nn.MultiheadAttention`

`DPMultiheadAttention` loads an `nn.MultiheadAttention` state dict (the fused `in_proj_weight`
is split into the three projections) and computes the same function, in both layouts.""",
    ),
    (
        "code",
        """from opacus.layers import DPMultiheadAttention

for batch_first in (True, False):
    torch_mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    dp_mha = DPMultiheadAttention(16, 4, batch_first=batch_first)
    dp_mha.load_state_dict(torch_mha.state_dict())
    q = torch.randn(3, 5, 16)  # (N, L, E) if batch_first else (L, N, E)
    expected, _ = torch_mha(q, q, q)
    got, _ = dp_mha(q, q, q)
    print(f"batch_first={batch_first}: max |difference| {(got - expected).abs().max():.2e}")""",
    ),
    (
        "md",
        """## 2. Per-example gradients, checked against a loop

`GradSampleModule` (what `make_private` wraps the model in) stores every example's gradient
in `p.grad_sample`. We compare them with the slow, obviously correct computation: one backward
pass per example. The batch size (3) differs from the sequence length (5) and from the number of
heads, so any mix-up of dimensions would show.""",
    ),
    (
        "code",
        """from opacus import GradSampleModule


class AttentionThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = DPMultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(dim=1))


import copy

torch.manual_seed(0)
model = AttentionThenLinear()
reference = copy.deepcopy(model)  # an unhooked copy for the one-example-at-a-time loop
x, target = torch.randn(3, 5, 16), torch.tensor([0, 1, 1])
gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
nn.functional.cross_entropy(gsm(x), target, reduction="sum").backward()

worst = 0.0
for i in range(len(x)):
    reference.zero_grad()
    loss = nn.functional.cross_entropy(reference(x[i:i + 1]), target[i:i + 1], reduction="sum")
    loss.backward()
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        worst = max(worst, (p.grad_sample[i] - p_ref.grad).abs().max().item())
shapes = {name: tuple(p.grad_sample.shape) for name, p in model.named_parameters()}
print("grad_sample shapes:", {k: v for k, v in list(shapes.items())[:3]}, "...")
print(f"largest difference from the per-example loop: {worst:.2e}")""",
    ),
    (
        "md",
        """## 3. Data

800 short sentences about four topics, generated by `examples/data/make_sentences.py`
(deterministic, so the file can be regenerated).""",
    ),
    (
        "code",
        """from torch.utils.data import DataLoader, TensorDataset

path = os.path.join("..", "examples", "data", "sentences.tsv")
with open(path, encoding="utf8") as f:
    next(f)
    rows = [line.rstrip("\\n").split("\\t", 1) for line in f if line.strip()]
for label, sentence in rows[:4]:
    print(f"{label:8s} {sentence}")

PAD, UNK = 0, 1
n_test = len(rows) // 5
train_rows, test_rows = rows[n_test:], rows[:n_test]
vocab = {w: i + 2 for i, w in enumerate(sorted({w for _, s in train_rows for w in s.split()}))}
labels = {name: i for i, name in enumerate(sorted({label for label, _ in rows}))}
max_len = max(len(s.split()) for _, s in rows)


def encode(rows):
    ids = torch.full((len(rows), max_len), PAD)
    for i, (_, sentence) in enumerate(rows):
        words = [vocab.get(w, UNK) for w in sentence.split()]
        ids[i, :len(words)] = torch.tensor(words)
    return TensorDataset(ids, torch.tensor([labels[label] for label, _ in rows]))


train_set, test_set = encode(train_rows), encode(test_rows)
print(f"{len(train_set)} train, {len(test_set)} test, {len(vocab)} words, "
      f"labels {list(labels)}")""",
    ),
    (
        "md",
        """## 4. A small transformer

Embeddings (words and positions), one pre-norm attention block with a feed-forward layer, mean
pooling over the non-padding positions, and a linear head: `DPMultiheadAttention(batch_first=True)`
right next to `nn.Linear`, `nn.Embedding` and `nn.LayerNorm`, the combination Opacus 1.6 got
wrong.""",
    ),
    (
        "code",
        """class TinyTransformer(nn.Module):
    def __init__(self, vocab_size, num_classes, dim=32, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.position = nn.Embedding(max_len, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = DPMultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids):  # (N, L)
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        h = self.embed(ids) + self.position(positions)
        padding = ids == PAD
        x = self.norm1(h)
        h = h + self.attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        h = h + self.ff(self.norm2(h))
        keep = (~padding).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))


def evaluate(model):
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb).argmax(-1) == yb).sum().item()
                      for xb, yb in DataLoader(test_set, batch_size=256))
    model.train()
    return correct / len(test_set)


print(TinyTransformer(len(vocab) + 2, len(labels)))""",
    ),
    (
        "md",
        """## 5. Private training

`make_private(..., batch_first=True)`: every layer, attention included, sees the batch on
dimension 0. The noise multiplier and batch size are chosen for this small data set: with only
640 training sentences each example is sampled often, which is what makes ε grow.""",
    ),
    (
        "code",
        """from opacus import PrivacyEngine

EPOCHS = 4 if FAST else 20
torch.manual_seed(0)
model = TinyTransformer(len(vocab) + 2, len(labels))
privacy_engine = PrivacyEngine(accountant="prv")
model, optimizer, train_loader = privacy_engine.make_private(
    module=model,
    optimizer=torch.optim.Adam(model.parameters(), lr=0.02),
    data_loader=DataLoader(train_set, batch_size=128),
    noise_multiplier=1.5,
    max_grad_norm=1.0,
    batch_first=True,
)
criterion = nn.CrossEntropyLoss()
start = time.time()
for epoch in range(1, EPOCHS + 1):
    for xb, yb in train_loader:
        optimizer.zero_grad()
        out = model(xb)
        (criterion(out, yb) if len(yb) else out.sum() * 0.0).backward()
        optimizer.step()
    if epoch % 5 == 0 or epoch == EPOCHS:
        print(f"epoch {epoch:2d}: test accuracy {evaluate(model):.3f}, "
              f"eps {privacy_engine.get_epsilon(1e-5):.2f}")
print(f"{time.time() - start:.1f}s; chance is {1 / len(labels):.2f}")""",
    ),
    (
        "md",
        """How large are the per-example gradients that DP-SGD clips? One batch through the private
model, then the L2 norm of each example's whole gradient (all parameters together) from the
`grad_sample` the hooks computed. Every example above `max_grad_norm` is scaled down to it.""",
    ),
    (
        "code",
        """import matplotlib.pyplot as plt

xb, yb = next(iter(DataLoader(train_set, batch_size=128)))
optimizer.zero_grad()
criterion(model(xb), yb).backward()
norms = torch.stack(
    [p.grad_sample.reshape(len(xb), -1).norm(dim=1) for p in model.parameters()
     if p.requires_grad and p.grad_sample is not None]
).norm(dim=0)
optimizer.zero_grad()
clipped = (norms > 1.0).float().mean().item()
print(f"{len(norms)} per-example norms, median {norms.median():.2f}; {clipped:.0%} are clipped")
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.hist(norms.numpy(), bins=30)
ax.axvline(1.0, color="red", linestyle="--", label="max_grad_norm = 1.0")
ax.set_xlabel("per-example gradient L2 norm")
ax.set_ylabel("examples")
ax.set_title("Per-example gradient norms after training")
ax.legend()
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        """## 6. Sequence-first models

With `batch_first=False` the tensors are `(L, N, E)` and the per-example hooks look for the batch
on dimension 1 — in **every** layer. A head applied to a pooled `(N, E)` tensor would break that;
keep a length-1 sequence dimension instead (`examples/text_classification.py --layout seq-first`
does exactly this and trains identically to the batch-first layout).""",
    ),
    (
        "code",
        """torch.manual_seed(0)


class SeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = DPMultiheadAttention(16, 4, batch_first=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x):  # (L, N, E)
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(dim=0, keepdim=True)).squeeze(0)  # head sees (1, N, E)


gsm = GradSampleModule(SeqFirst(), batch_first=False)
x = torch.randn(5, 3, 16)
nn.functional.cross_entropy(gsm(x), torch.tensor([0, 1, 1])).backward()
print({name: tuple(p.grad_sample.shape) for name, p in gsm.named_parameters()
       if name.endswith("weight")})""",
    ),
]

ACCOUNTING = [
    (
        "md",
        """# A guide to privacy accounting

DP-SGD's guarantee is stated as `(ε, δ)`: for any two data sets differing in one example, every
outcome of training is at most `e^ε` times more likely with one than with the other, except with
probability δ. An *accountant* computes ε from what training did: how many steps, with which
sampling rate `q` and noise multiplier σ. This notebook compares the three accountants of
`opacus.accountants`, shows how ε depends on `q`, σ and the number of steps, and how to choose σ
for a target ε.""",
    ),
    ("code", SETUP),
    (
        "md",
        """## Three accountants, one training run

The digits example: 1438 training images, batches of 64 (`q = 1/23`), σ = 1, δ = 1e-5.

- **RDP** (Rényi DP, Mironov 2017): a valid upper bound, slightly loose;
- **PRV** (privacy random variables, Gopi et al. 2021): numerically composes the privacy loss
  distribution, tight up to a controlled error — the default of `PrivacyEngine`;
- **GDP** (Gaussian DP, Dong et al. 2019): a central-limit approximation; it can report *less*
  than the true ε, especially for few steps.""",
    ),
    (
        "code",
        """from opacus.accountants import create_accountant

q, sigma, delta = 1 / 23, 1.0, 1e-5
epochs = [1, 5, 10, 20] if FAST else [1, 2, 5, 10, 20, 50]
print(f"{'epochs':>6} {'RDP':>7} {'PRV':>7} {'GDP':>7}")
for e in epochs:
    row = []
    for name in ("rdp", "prv", "gdp"):
        accountant = create_accountant(name)
        accountant.history = [(sigma, q, e * 23)]  # (noise_multiplier, sample_rate, steps)
        row.append(accountant.get_epsilon(delta))
    print(f"{e:6d} " + " ".join(f"{v:7.2f}" for v in row))""",
    ),
    (
        "code",
        """import matplotlib.pyplot as plt

curve = list(range(1, (20 if FAST else 50) + 1, 1 if FAST else 2))
fig, ax = plt.subplots(figsize=(5, 3.2))
for name in ("rdp", "prv", "gdp"):
    values = []
    for e in curve:
        accountant = create_accountant(name)
        accountant.history = [(sigma, q, e * 23)]
        values.append(accountant.get_epsilon(delta))
    ax.plot(curve, values, label=name.upper())
ax.set_xlabel("epochs (q = 1/23, σ = 1.0)")
ax.set_ylabel("ε at δ = 1e-5")
ax.set_title("ε over training")
ax.legend()
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        """## An independent check

Google's `dp_accounting` library (a test dependency of this project) implements the privacy
loss distribution (PLD) accountant; the PRV numbers should agree with it closely.""",
    ),
    (
        "code",
        """try:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
except ImportError:
    print("dp_accounting is not installed; skipping")
else:
    for e in (1, 10):
        pld = PLDAccountant()
        pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                    e * 23)
        prv = create_accountant("prv")
        prv.history = [(sigma, q, e * 23)]
        print(f"{e:2d} epochs: PRV {prv.get_epsilon(delta):.3f}, "
              f"dp_accounting PLD {pld.get_epsilon(delta):.3f}")""",
    ),
    (
        "md",
        """## What makes ε grow

ε grows with the number of steps (roughly like its square root), with the sampling rate, and
falls quickly with σ. Halving `q` at a fixed number of *epochs* also halves the steps' privacy
cost while doubling their number, which is a net gain: more, smaller batches are cheaper.""",
    ),
    (
        "code",
        """from opacus.accountants import RDPAccountant


def eps(sigma, q, epochs, delta=1e-5, name="prv"):
    accountant = create_accountant(name)
    accountant.history = [(sigma, q, int(round(epochs / q)))]
    return accountant.get_epsilon(delta)


print("noise multiplier (q=0.01, 10 epochs):")
for s in (0.6, 0.8, 1.0, 1.5, 2.0, 4.0):
    print(f"  sigma {s:3.1f}: eps {eps(s, 0.01, 10):7.2f}")
print("sampling rate (sigma=1, 10 epochs):")
for rate in (0.001, 0.01, 0.05, 0.2):
    print(f"  q {rate:5.3f}: eps {eps(1.0, rate, 10):7.2f}")
print("delta (sigma=1, q=0.01, 10 epochs):")
for d in (1e-3, 1e-5, 1e-7):
    print(f"  delta {d:.0e}: eps {eps(1.0, 0.01, 10, delta=d):7.2f}")""",
    ),
    (
        "md",
        """## From a target ε to a noise multiplier

`get_noise_multiplier` searches σ such that the given accountant reports ε just below the target
after the planned epochs (or steps). `make_private_with_epsilon` calls it for you.""",
    ),
    (
        "code",
        """from opacus.accountants.utils import get_noise_multiplier

for target in (1.0, 3.0, 8.0):
    s = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=1 / 23,
                             epochs=10, accountant="prv")
    print(f"target eps {target:3.1f} over 10 epochs at q=1/23: sigma = {s:.3f} "
          f"(check: eps {eps(s, 1 / 23, 10):.2f})")""",
    ),
    (
        "md",
        """## The accountant inside `PrivacyEngine`

`make_private` attaches the engine's accountant to the optimizer: every real optimizer step
records one `(σ, q)` event (skipped steps of virtual batches are not counted). Consecutive
identical events are merged into `(σ, q, steps)`.""",
    ),
    (
        "code",
        """from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine

data = TensorDataset(torch.randn(1000, 5), torch.randint(0, 2, (1000,)))
model = nn.Linear(5, 2)
engine = PrivacyEngine(accountant="rdp")
model, optimizer, loader = engine.make_private(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    data_loader=DataLoader(data, batch_size=50), noise_multiplier=1.1, max_grad_norm=1.0,
)
for xb, yb in loader:
    optimizer.zero_grad()
    out = model(xb)
    (nn.functional.cross_entropy(out, yb) if len(yb) else out.sum() * 0.0).backward()
    optimizer.step()
print("history:", engine.accountant.history)
print(f"eps after one epoch: {engine.get_epsilon(1e-5):.3f}")""",
    ),
    (
        "md",
        """## Reading an ε

- Always report δ, the accountant and the training parameters (σ, q, steps) with ε.
- ε below ~1 is a strong guarantee, single digits are common in practice, and very large values
  (say, above 50) say little — but they still bound what an attacker can learn, unlike no DP.
- The guarantee holds only if training did what the accountant assumes: Poisson sampling at rate
  `q`, every example's gradient clipped, noise added at every step.""",
    ),
    (
        "md",
        """## Checking the claim: auditing a run

The last point is testable. `opacus.auditing` measures a statistical *lower* bound on ε from how
well an adversary can tell whether a canary was in the training data. Here one training run carries
1000 gradient canaries, each included with probability ½ (Steinke, Nasr, Jagielski 2023); the
number of correct guesses about which canaries were in gives `eps_lower` at 95 % confidence. A
correct implementation never shows `eps_lower > eps_claimed`; a broken one (clipping off, noise too
small, per-sample gradients mixed across samples) does.""",
    ),
    (
        "code",
        """from opacus.auditing import audit_dp_sgd_one_run

torch.manual_seed(0)
x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
result = audit_dp_sgd_one_run(
    lambda: nn.Linear(4, 2), (x, y), dict(noise_multiplier=2.0, max_grad_norm=1.0),
    num_canaries=300 if FAST else 1000,
)
print(result.summary())
assert result.eps_lower <= result.eps_claimed""",
    ),
]

NOTEBOOKS = {
    "building_image_classifier.ipynb": IMAGE,
    "building_text_classifier.ipynb": TEXT,
    "guide_to_privacy_accounting.ipynb": ACCOUNTING,
}


def make_notebook(cells):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in cells:
        new = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        nb.cells.append(new(source))
    return nb


def execute(nb, timeout=600):
    from nbclient import NotebookClient

    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": HERE}}
    ).execute()
    return nb


def main(argv=None):
    import nbformat

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-execute", action="store_true", help="write the sources only")
    p.add_argument("names", nargs="*", help="notebooks to build (default: all)")
    args = p.parse_args(argv)
    for name in args.names or NOTEBOOKS:
        nb = make_notebook(NOTEBOOKS[name])
        # stable cell ids keep the committed JSON diffable between rebuilds
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"cell-{i:02d}"
        if not args.no_execute:
            execute(nb)
        nbformat.write(nb, os.path.join(HERE, name))
        print(f"wrote {name}")


if __name__ == "__main__":
    main()

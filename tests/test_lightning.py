"""``opacus.lightning``: optional dependency handling and DP training through Lightning."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def _python(code):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_importing_opacus_never_imports_lightning():
    result = _python("""
        import sys, opacus, opacus.utils.adaptive_clipping, opacus.utils.fsdp_utils
        print(sorted(m for m in ("lightning", "pytorch_lightning") if m in sys.modules))
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_import_without_lightning_says_what_to_install():
    result = _python("""
        import sys
        sys.modules["lightning"] = None  # makes `import lightning` raise ImportError
        sys.modules["pytorch_lightning"] = None
        try:
            import opacus.lightning
        except ImportError as e:
            print("IMPORTERROR", e)
        """)
    assert result.returncode == 0, result.stderr
    assert "IMPORTERROR" in result.stdout
    assert "pip install pytorch-lightning" in result.stdout


pl = pytest.importorskip("pytorch_lightning")
from opacus import PrivacyEngine  # noqa: E402
from opacus.data_loader import DPDataLoader  # noqa: E402
from opacus.lightning import DPLightningDataModule  # noqa: E402


def test_data_module_is_a_pytorch_lightning_data_module():
    """Where both ``pytorch_lightning`` and ``lightning`` are installed (a GPU image had both),
    Opacus 1.6's package wins: a ``pytorch_lightning.Trainer`` accepts the wrapped module."""
    assert issubclass(DPLightningDataModule, pl.LightningDataModule)


def _dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


class _DataModule(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.calls = []

    def prepare_data(self):
        self.calls.append("prepare_data")

    def setup(self, stage=None):
        self.calls.append(f"setup:{stage}")
        self.train, self.val = _dataset(128, 0), _dataset(32, 1)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=16)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=8)

    def test_dataloader(self):
        return DataLoader(self.val, batch_size=4)


class _DPClassifier(pl.LightningModule):
    def __init__(self, noise_multiplier=0.5):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
        self.noise_multiplier = noise_multiplier
        self.privacy_engine = PrivacyEngine(accountant="rdp")
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.steps += 1
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.net.parameters(), lr=0.5)
        data_loader = self.trainer.datamodule.train_dataloader()
        self.net, optimizer, _ = self.privacy_engine.make_private(
            module=self.net,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=1.0,
            poisson_sampling=False,  # the datamodule already draws Poisson batches
            noise_generator=torch.Generator().manual_seed(0),
        )
        return optimizer


def test_train_dataloader_is_poisson_and_others_pass_through():
    inner = _DataModule()
    dm = DPLightningDataModule(inner, generator=torch.Generator().manual_seed(0))
    dm.prepare_data()
    dm.setup("fit")
    assert inner.calls == ["prepare_data", "setup:fit"]
    train = dm.train_dataloader()
    assert isinstance(train, DPDataLoader)
    assert train.dataset is inner.train
    assert train.sample_rate == pytest.approx(1 / 8)
    sizes = [len(x) for x, _ in train]
    assert len(sizes) == 8 and len(set(sizes)) > 1  # Poisson: batch sizes vary
    val = dm.val_dataloader()
    assert not isinstance(val, DPDataLoader) and val.batch_size == 8
    assert dm.test_dataloader().batch_size == 4


def test_dp_training_with_lightning_trainer():
    model = _DPClassifier()
    dm = DPLightningDataModule(_DataModule(), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.net.parameters()]
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    history = model.privacy_engine.accountant.history
    assert sum(n for _, _, n in history) == model.steps > 0
    assert all(sigma == 0.5 and q == pytest.approx(1 / 8) for sigma, q, _ in history)
    eps = model.privacy_engine.get_epsilon(1e-5)
    assert 0 < eps < float("inf")
    assert any(not torch.equal(a, p) for a, p in zip(before, model.net.parameters()))
    # The training batches came from the DP (Poisson) loader.
    assert isinstance(trainer.train_dataloader, DPDataLoader)

"""PyTorch Lightning integration: Poisson sampling for a ``LightningDataModule``.

Needs ``pytorch-lightning`` (or ``lightning``); importing :mod:`opacus` itself never does.
"""

from typing import Optional

import torch

# ``pytorch_lightning`` first (the package Opacus 1.6 builds on); the unified ``lightning``
# package where it is the only one installed. Where both are, Lightning's own checks refuse a
# data module of one package in a Trainer of the other: use ``pytorch_lightning.Trainer``.
try:
    import pytorch_lightning as pl
except ImportError:
    try:
        import lightning.pytorch as pl
    except ImportError as e:
        raise ImportError(
            "opacus.lightning needs PyTorch Lightning: `pip install pytorch-lightning` (or "
            "`pip install lightning`)"
        ) from e

from opacus.data_loader import DPDataLoader

__all__ = ["DPLightningDataModule"]


class DPLightningDataModule(pl.LightningDataModule):
    """Wraps ``datamodule`` so that ``train_dataloader()`` draws Poisson batches.

    The training loader is ``DPDataLoader.from_data_loader(datamodule.train_dataloader())``:
    same dataset and collate function, each sample included independently with probability
    ``1 / len(loader)`` (the sampling the privacy accountant assumes).  Validation, test and
    predict loaders, ``prepare_data``, ``setup`` and ``teardown`` are the wrapped module's.
    """

    def __init__(
        self,
        datamodule: pl.LightningDataModule,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        self.datamodule = datamodule
        self.generator = generator

    def prepare_data(self) -> None:
        """The wrapped module's ``prepare_data``."""
        self.datamodule.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        """The wrapped module's ``setup``."""
        self.datamodule.setup(stage)

    def teardown(self, stage: Optional[str] = None) -> None:
        """The wrapped module's ``teardown``."""
        self.datamodule.teardown(stage)

    def train_dataloader(self):
        """Poisson-sampled version of the wrapped module's training loader."""
        return DPDataLoader.from_data_loader(
            self.datamodule.train_dataloader(), generator=self.generator
        )

    def val_dataloader(self):
        """The wrapped module's validation loader, unchanged."""
        return self.datamodule.val_dataloader()

    def test_dataloader(self):
        """The wrapped module's test loader, unchanged."""
        return self.datamodule.test_dataloader()

    def predict_dataloader(self):
        """The wrapped module's predict loader, unchanged."""
        return self.datamodule.predict_dataloader()

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """Delegated to the wrapped module (it may move custom batch types)."""
        return self.datamodule.transfer_batch_to_device(batch, device, dataloader_idx)

    def state_dict(self):
        """The wrapped module's state."""
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict) -> None:
        """Restore the wrapped module's state."""
        self.datamodule.load_state_dict(state_dict)

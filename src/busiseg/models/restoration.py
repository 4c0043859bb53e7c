"""LightningModule for self-supervised pretraining: restore corrupted images (``python -m busiseg.pretrain``).

The network is the multi-task U-Net itself (:class:`busiseg.models.net.MultiTaskUnet`): its one-channel
mask output, through a sigmoid, is read as the restored grey image and trained with the mean squared
error against the uncorrupted image. Encoder, decoder and mask head all learn; the class head gets no
gradient and keeps its zero initialisation. Masks and labels in the batches are never read, so the
weights it ends with carry nothing of the annotations; ``python -m busiseg.train init_weights=...``
starts the supervised fit from them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torchmetrics import MeanMetric

from busiseg.data.corruptions import RestorationCorruption
from busiseg.models.guards import check_loss
from busiseg.models.module import ScheduledModule


def restoration_target(images: torch.Tensor) -> torch.Tensor:
    """What the one-channel output restores: the grey image (the channel mean of an RGB copy)."""
    return images.float().mean(dim=1, keepdim=True)


class RestorationModule(ScheduledModule):
    """Corrupt each batch (:class:`RestorationCorruption`), restore it, MSE against the original.

    Logs ``train/restore_loss`` and ``val/restore_loss`` (the validation images corrupted with a
    fixed seed, so the curve compares epochs on the same corruptions), and keeps the last validation
    batch's (original, corrupted, restored) triple for :class:`busiseg.pretrain.RestorationImageLogger`.
    """

    def __init__(self, net: nn.Module, corruption: RestorationCorruption,
                 optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable[..., Any] | None = None,
                 config: dict | None = None, channels_last: bool = False, val_seed: int = 0):
        super().__init__()
        self.save_hyperparameters({"config": config or {}})
        self.net = net
        self.corruption = corruption
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.channels_last = channels_last
        self.val_seed = int(val_seed)
        self.val_loss = MeanMetric()
        self.nonfinite = "stop"
        self.last_val_triple: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The restored image in [0, 1], shape (B, 1, H, W)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        mask_logits, _ = self.net(images)
        return torch.sigmoid(mask_logits.float())

    def _loss(self, images: torch.Tensor, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        restored = self(corrupted)
        return nn.functional.mse_loss(restored, restoration_target(images)), restored

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        images = batch["image"]
        loss, _ = self._loss(images, self.corruption(images))
        if not check_loss(self, loss, batch, self.nonfinite):
            return None
        self.log("train/restore_loss", loss.detach(), on_step=True, on_epoch=True, batch_size=images.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        # the same corruptions of the same validation images at every epoch
        self._val_generator_state = self.corruption.generator
        self.corruption.generator = torch.Generator().manual_seed(self.val_seed)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        images = batch["image"]
        corrupted = self.corruption(images)
        loss, restored = self._loss(images, corrupted)
        self.val_loss.update(loss.detach().float(), images.shape[0])
        if batch_idx == 0:
            self.last_val_triple = (restoration_target(images).cpu(), restoration_target(corrupted).cpu(),
                                    restored.detach().cpu())

    def on_validation_epoch_end(self) -> None:
        self.corruption.generator = self._val_generator_state
        if self.trainer.sanity_checking:
            self.val_loss.reset()
            return
        self.log("val/restore_loss", self.val_loss.compute(), sync_dist=True)
        self.val_loss.reset()


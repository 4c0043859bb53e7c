"""LightningModule: one training/validation/test step for the multi-task U-Net."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from busiseg.checkpoint import TRAINED_ON_KEY, trained_on
from busiseg.data.labels import NUM_CLASSES
from busiseg.models.guards import check_loss
from busiseg.models.losses import MultiTaskLoss
from busiseg.models.metrics import classification_metrics, confusion_matrix_metric, segmentation_metrics

STAGES = ("train", "val", "test")
LOSS_KEYS = ("loss", "seg_loss", "cls_loss")


class ScheduledModule(L.LightningModule):
    """What busiseg's LightningModules share: the optimizer and per-step scheduler built from the
    half-built factories in ``self.optimizer_factory`` / ``self.scheduler_factory``, and the names of
    the training images in every checkpoint (``busiseg.trained_on``)."""

    optimizer_factory: Callable[..., torch.optim.Optimizer]
    scheduler_factory: Callable[..., Any] | None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the training images, so that init_weights=<this checkpoint> can refuse a split that scores them
        checkpoint[TRAINED_ON_KEY] = trained_on(self.trainer)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class MultiTaskModule(ScheduledModule):
    """Wraps the network, the loss and one set of metrics per stage.

    Args:
        net: returns ``(mask_logits, class_logits)`` for images in [0, 1].
        loss: MultiTaskLoss (segmentation + classification + weighting).
        optimizer: half-built optimizer (Hydra ``_partial_: true``), completed with the parameters.
        scheduler: half-built ``busiseg.models.scheduler`` factory taking ``total_steps``, or None.
        config: the resolved run config as plain containers; stored in the checkpoint's
            hyperparameters so eval/predict can rebuild the model (no objects: checkpoints
            load with ``torch.load(weights_only=True)``).
        channels_last: run the network in NHWC memory format (faster convolutions on
            GPUs with tensor cores and on recent CPUs; measure, see docs/performance.md).
        compile: ``torch.compile`` the network in place (state_dict keys unchanged, so
            checkpoints stay interchangeable); pays off on long GPU runs.
        device_augment: a ``busiseg.data.device_augment`` recipe applied to training
            batches after they reach the device (``augment_on_device=true``).
        batch_mix: a ``busiseg.data.mixing.BatchMix`` (config group ``mix``) applied to training batches
            on the device, after ``device_augment``; it adds the mixed class targets as ``label_probs``
            (``label`` stays the first image's class index).
    """

    def __init__(self, net: nn.Module, loss: MultiTaskLoss, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, config: dict | None = None,
                 channels_last: bool = False, compile: bool = False, device_augment: nn.Module | None = None,
                 batch_mix: nn.Module | None = None):
        super().__init__()
        self.device_augment = device_augment
        self.batch_mix = batch_mix
        self.channels_last = channels_last
        self.compile_net = compile
        self.save_hyperparameters({"config": config or {}})
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # ModuleDict keys cannot be "train" (nn.Module.train exists): keyed "train_", "val_", "test_"
        self.seg_metrics = nn.ModuleDict({f"{s}_": segmentation_metrics(f"{s}/") for s in STAGES})
        self.cls_metrics = nn.ModuleDict({f"{s}_": classification_metrics(f"{s}/", NUM_CLASSES) for s in STAGES})
        self.test_confusion = confusion_matrix_metric(NUM_CLASSES)
        self.test_confusion_result: torch.Tensor | None = None
        # val/test losses as torchmetrics means (sums and image counts added over DDP ranks, so equal
        # to one process; Lightning's own sync_dist mean truncates an uneven image count to an int)
        self.loss_means = nn.ModuleDict(
            {f"{s}_": nn.ModuleDict({k: MeanMetric() for k in LOSS_KEYS}) for s in STAGES if s != "train"})
        # what a NaN/inf training loss does: "stop" (raise, naming the batch's files) or "skip" the batch
        # (config guard.nonfinite; see busiseg.models.guards.check_loss)
        self.nonfinite = "stop"

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.compile_net and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        if self.trainer is None or not self.trainer.training:
            return batch
        batch = dict(batch)
        if self.device_augment is not None:
            batch["image"], batch["mask"] = self.device_augment(batch["image"], batch["mask"])
        if self.batch_mix is not None:
            batch["image"], batch["mask"], batch["label_probs"] = self.batch_mix(
                batch["image"], batch["mask"], batch["label"], step=self.trainer.global_step)
        return batch

    def forward(self, images: torch.Tensor, return_aux: bool = False) -> tuple:
        """``(mask_logits, class_logits)``; with ``return_aux`` also the deep-supervision logits (a list)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images, return_aux=True) if return_aux else self.net(images)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor | None:
        if stage == "train" and getattr(self.net, "deep_supervision", 0):
            # deep supervision (model.deep_supervision): the extra mask heads are trained, never evaluated
            mask_logits, class_logits, aux_logits = self(batch["image"], return_aux=True)
        else:
            (mask_logits, class_logits), aux_logits = self(batch["image"]), ()
        targets = batch.get("label_probs", batch["label"])  # class probabilities in mixed batches
        losses = self.loss(mask_logits, class_logits, batch["mask"], targets, aux_mask_logits=aux_logits)
        if stage == "train" and not check_loss(self, losses["loss"], batch, self.nonfinite):
            return None  # skipped: no metrics, no logging, no optimizer step
        mask_probs = torch.sigmoid(mask_logits.detach().float())
        class_probs = torch.softmax(class_logits.detach().float(), dim=1)
        # a Mixup mask is soft: the metrics see it thresholded at 0.5 (binary masks unchanged)
        self.seg_metrics[f"{stage}_"].update(mask_probs, (batch["mask"] >= 0.5).int())
        # in a mixed batch the training metrics score the class with the larger share
        labels = batch["label_probs"].argmax(dim=1) if "label_probs" in batch else batch["label"]
        self.cls_metrics[f"{stage}_"].update(class_probs, labels)
        if stage == "test":
            self.test_confusion.update(class_probs, batch["label"])
        batch_size = batch["image"].shape[0]
        if stage == "train":  # per step and per epoch; under DDP this rank's (no per-step sync)
            main = {f"train/{k}": losses[k].detach() for k in LOSS_KEYS}
            self.log("train/loss", main.pop("train/loss"), on_step=True, on_epoch=True, batch_size=batch_size,
                     prog_bar=True)  # the progress bar shows the loss
            self.log_dict(main, on_step=True, on_epoch=True, batch_size=batch_size)
        else:
            means = self.loss_means[f"{stage}_"]
            for k in LOSS_KEYS:
                means[k].update(losses[k].detach().float(), batch_size)
            self.log_dict({f"{stage}/{k}": means[k] for k in LOSS_KEYS}, on_step=False, on_epoch=True,
                          batch_size=batch_size)
        if stage == "train":
            # task weights (fixed, or learned by the uncertainty weighting)
            extras = {f"train/{k}": v.detach() for k, v in losses.items() if k not in LOSS_KEYS}
            self.log_dict(extras, on_step=False, on_epoch=True, batch_size=batch_size)
        return losses["loss"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        values = {**self.seg_metrics[f"{stage}_"].compute(), **self.cls_metrics[f"{stage}_"].compute()}
        # torchmetrics has already summed the states of all DDP ranks: the values are equal on every rank
        shown = {f"{stage}/dice", f"{stage}/accuracy"} if stage == "val" else set()  # beside the loss in the bar
        self.log_dict({k: v.float() for k, v in values.items() if k not in shown}, prog_bar=False, sync_dist=True)
        self.log_dict({k: v.float() for k, v in values.items() if k in shown}, prog_bar=True, sync_dist=True)
        self.seg_metrics[f"{stage}_"].reset()
        self.cls_metrics[f"{stage}_"].reset()

    def on_train_start(self) -> None:
        # The sanity check ran validation steps; their counts must not leak into epoch 0.
        self.seg_metrics["val_"].reset()
        self.cls_metrics["val_"].reset()
        for mean in self.loss_means["val_"].values():
            mean.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.seg_metrics["val_"].reset()
            self.cls_metrics["val_"].reset()
            return
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")
        self.test_confusion_result = self.test_confusion.compute().cpu()
        self.test_confusion.reset()


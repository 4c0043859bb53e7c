"""Lightning callbacks for busiseg."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from busiseg.data.labels import CLASS_NAMES
from busiseg.models.reporting import render_prediction_grid, save_png

_TRAIN_LOG = logging.getLogger("busiseg.train")  # the epoch lines go with train.py's

__all__ = ["ValidationImageLogger"]


class ValidationImageLogger(Callback):
    """Log a grid of validation predictions (image, true/predicted mask, true/predicted class).

    At the end of every ``every_n_epochs``-th validation epoch (never during the sanity
    check, only on global rank 0) it takes a fixed set of ``num_images`` validation samples,
    evenly spaced over ``trainer.datamodule.val_dataset`` and chosen once, runs one forward
    pass in eval mode without gradients, and renders them with
    :func:`busiseg.models.reporting.render_prediction_grid` (mask: sigmoid >= 0.5; class:
    softmax arg-max with its probability).

    The picture goes to every :class:`~lightning.pytorch.loggers.TensorBoardLogger` as the
    image ``"val/predictions"`` at the step of the same validation's ``val/*`` scalars, and, if ``save_dir_png``, to
    ``<log dir>/val_predictions/epoch_{E:03d}.png`` where the log dir is the first logger's
    (as ``trainer.log_dir``) or ``trainer.default_root_dir`` without loggers.

    The module's train/eval flags are restored afterwards, submodule by submodule.
    """

    TAG = "val/predictions"
    PNG_DIRNAME = "val_predictions"

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, save_dir_png: bool = True) -> None:
        super().__init__()
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.num_images = int(num_images)
        self.every_n_epochs = int(every_n_epochs)
        self.save_dir_png = bool(save_dir_png)
        self._indices: list[int] | None = None
        self._dataset_len: int | None = None
        self.last_png_path: Path | None = None

    # ------------------------------------------------------------------ selection
    def select_indices(self, dataset_len: int) -> list[int]:
        """``num_images`` evenly spaced indices over ``range(dataset_len)``, first and last included."""
        if dataset_len <= 0:
            return []
        k = min(self.num_images, dataset_len)
        return sorted({int(i) for i in np.linspace(0, dataset_len - 1, k).round()})

    @staticmethod
    def _val_dataset(trainer: Trainer):
        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, "val_dataset", None) if datamodule is not None else None
        if dataset is None:  # no datamodule: fall back to the (single) val dataloader's dataset
            loaders = getattr(trainer, "val_dataloaders", None)
            dataset = getattr(loaders, "dataset", None)
        return dataset

    def _batch(self, dataset) -> dict[str, Any] | None:
        n = len(dataset)
        if self._indices is None or self._dataset_len != n:
            self._indices, self._dataset_len = self.select_indices(n), n
        if not self._indices:
            return None
        samples = [dataset[i] for i in self._indices]
        return {
            "image": torch.stack([torch.as_tensor(s["image"]) for s in samples]),
            "mask": torch.stack([torch.as_tensor(s["mask"]) for s in samples]),
            "label": torch.stack([torch.as_tensor(s["label"]).reshape(()) for s in samples]).long(),
            "index": [int(torch.as_tensor(s.get("index", i)).reshape(())) for s, i in zip(samples, self._indices)],
        }

    # ------------------------------------------------------------------ paths
    @staticmethod
    def _log_dir(trainer: Trainer) -> str:
        """Same answer as ``trainer.log_dir`` but without its collective broadcast (rank 0 only here)."""
        loggers = list(getattr(trainer, "loggers", None) or [])
        if loggers:
            first = loggers[0]
            path = first.log_dir if isinstance(first, (TensorBoardLogger, CSVLogger)) else first.save_dir
            if path:
                return str(path)
        return str(trainer.default_root_dir)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def _predict(self, trainer: Trainer, pl_module: LightningModule, images: torch.Tensor):
        precision = getattr(trainer, "precision_plugin", None)
        images = images.to(pl_module.device)
        if precision is not None:
            images = precision.convert_input(images)
        ctx = precision.forward_context() if precision is not None else contextlib.nullcontext()
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            with ctx:
                out = pl_module(images)
        finally:
            for m, training in modes:
                m.training = training
        if not isinstance(out, (tuple, list)) or len(out) < 2:
            raise TypeError(
                "ValidationImageLogger expects pl_module(images) to return (mask_logits, class_logits), "
                f"got {type(out).__name__}"
            )
        mask_logits, class_logits = out[0].float(), out[1].float()
        if mask_logits.shape[-2:] != images.shape[-2:]:
            mask_logits = torch.nn.functional.interpolate(mask_logits, size=images.shape[-2:], mode="bilinear")
        pred_masks = torch.sigmoid(mask_logits) >= 0.5
        probs = torch.softmax(class_logits, dim=1)
        return pred_masks.cpu(), probs.cpu()

    @staticmethod
    def _logger_step(trainer: Trainer) -> int:
        """The step Lightning gives this validation's scalars (``val/*``), so the grid sits beside them.

        Lightning logs a validation run inside a fit at the count of batches that stepped so far, which it
        raises only after the validation: one less than ``trainer.global_step`` there.
        """
        epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        return int(getattr(epoch_loop, "_batches_that_stepped", trainer.global_step))

    # ------------------------------------------------------------------ hook
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a fit's epochs only: not the sanity check, nor a validation of the kept checkpoint after the fit
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != TrainerFn.FITTING:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        dataset = self._val_dataset(trainer)
        if dataset is None:
            rank_zero_warn("ValidationImageLogger: no trainer.datamodule.val_dataset; nothing logged.")
            return
        batch = self._batch(dataset)
        if batch is None:
            return
        figure = self.render(trainer, pl_module, batch)

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.TAG, figure, global_step=self._logger_step(trainer), dataformats="HWC")
                logger.experiment.flush()

        if self.save_dir_png:
            path = Path(self._log_dir(trainer)) / self.PNG_DIRNAME / f"epoch_{trainer.current_epoch:03d}.png"
            save_png(figure, path)
            self.last_png_path = path

    @staticmethod
    def _titles(trainer: Trainer, indices: list[int]) -> list[str]:
        """The image's file name where the datamodule knows its records, else its index."""
        records = getattr(getattr(trainer, "datamodule", None), "records", None)
        if records:
            return [records[i].image.name for i in indices]
        return [f"val #{i}" for i in indices]

    def render(self, trainer: Trainer, pl_module: LightningModule, batch: dict[str, Any]) -> np.ndarray:
        """Forward ``batch`` and draw the prediction grid (HxWx3 uint8)."""
        pred_masks, probs = self._predict(trainer, pl_module, batch["image"])
        images = batch["image"].float()
        grey = images.mean(dim=1).numpy()  # (B,H,W): 1 channel, or 3 near-identical ones
        true_masks = batch["mask"][:, 0].numpy() > 0.5
        return render_prediction_grid(
            images=list(grey),
            true_masks=list(true_masks),
            pred_masks=list(pred_masks[:, 0].numpy()),
            true_labels=batch["label"].tolist(),
            pred_labels=probs.argmax(dim=1).tolist(),
            probs=probs.numpy(),
            class_names=CLASS_NAMES,
            ncols=4,
            titles=self._titles(trainer, [int(i) for i in batch["index"]]),
        )


class EpochSummary(Callback):
    """One line per epoch in the log (console and ``train.log``), as nnU-Net prints it: the epoch, its time, the
    training and validation losses, ``val/dice`` and ``val/accuracy`` (where there is a validation part), and the
    best ``best_of`` value so far, so a long fit can be followed from a piped console or the log file. Rank 0 only.
    (``best_of``, not ``monitor``: a run without validation images keeps this callback, for the training loss.)"""

    KEYS = ("train/loss_epoch", "val/loss", "val/dice", "val/accuracy")

    def __init__(self, best_of: str = "val/dice", mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"EpochSummary: mode must be max or min, got {mode!r}")
        self.best_of, self.mode = best_of, mode
        self.best: tuple[float, int] | None = None
        self._started = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a fit resumed mid-epoch does not call on_train_epoch_start for that epoch: its time counts from here
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the epoch's validation, with the epoch's mean training loss in callback_metrics
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch
        value = metrics.get(self.best_of)
        if value is not None:
            value = float(value)
            better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
            if better:
                self.best = (value, epoch)
        shown = ", ".join(f"{k.removesuffix('_epoch')} {float(metrics[k]):.4f}" for k in self.KEYS if k in metrics)
        best = (f"; best {self.best_of} {self.best[0]:.4f} (epoch {self.best[1] + 1}{self._kept_file(trainer)})"
                if self.best else "")
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        _TRAIN_LOG.info("epoch %d%s (%.0f s): %s%s", epoch + 1, total,
                                                time.perf_counter() - self._started, shown, best)

    def _kept_file(self, trainer: Trainer) -> str:
        """", epoch_002.ckpt": the file a checkpoint callback keeps for the same best, whose name counts epochs
        from 0 as Lightning does (the log counts from 1); "" where none keeps it or its name needs other values.
        (The name is formatted here: a checkpoint callback saves after this callback has logged the epoch.)"""
        assert self.best is not None
        value, epoch = self.best
        for cb in getattr(trainer, "checkpoint_callbacks", None) or ():
            if not (isinstance(cb, ModelCheckpoint) and cb.monitor == self.best_of and cb.mode == self.mode
                    and cb.save_top_k != 0):
                continue
            keys = set(re.findall(r"\{(.*?)[:\}]", cb.filename or "{epoch}-{step}"))
            if keys <= {"epoch", self.best_of}:
                name = cb.format_checkpoint_name({"epoch": torch.tensor(epoch), self.best_of: torch.tensor(value)})
                return f", {Path(name).name}"
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"best": list(self.best) if self.best else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        best = state_dict.get("best")
        self.best = (float(best[0]), int(best[1])) if best else None

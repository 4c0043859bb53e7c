"""Self-supervised pretraining by restoration: ``python -m busiseg.pretrain [overrides]``.

The multi-task U-Net learns to restore corrupted training images (busiseg.models.restoration): no
mask and no label is read. The same config tree as ``busiseg.train`` (data, split, model, optimizer,
scheduler, trainer), so that ``experiment=busi_cpu split=kfold split.fold=F`` pretrains on exactly
the training part of fold F; then

    python -m busiseg.train experiment=busi_cpu split=kfold split.fold=F init_weights=<run>/checkpoints/last.ckpt

fine-tunes from the restored-image network. The checkpoint lists the images it saw, and the fine-tune
refuses a split whose validation or test images are among them. Writes ``metrics.json``,
``restoration.png`` (original, corrupted, restored) and TensorBoard scalars and images in its run dir,
``logs/pretrain/runs/<time>``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from busiseg.cli import entry_point, fail  # noqa: E402
from busiseg.data.busi import DatasetError, summarize  # noqa: E402
from busiseg.data.corruptions import RestorationCorruption  # noqa: E402
from busiseg.data.splits import PARTS  # noqa: E402
from busiseg.models.guards import NonFiniteLossError, TrainingInterrupted, fit_or_raise_interrupted  # noqa: E402
from busiseg.models.net import EncoderWeightsUnavailable  # noqa: E402
from busiseg.models.reporting import save_png  # noqa: E402
from busiseg.models.restoration import RestorationModule  # noqa: E402
from busiseg.run_info import record_run  # noqa: E402
from busiseg.train import (CONFIG_DIR, ConfigError, _plain, _scalars, build_datamodule, build_trainer,  # noqa: E402
                           prepare_run, resolve_precision, write_json)

log = logging.getLogger("busiseg.pretrain")


def restoration_grid(triple: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_images: int = 8) -> np.ndarray:
    """Rows original / corrupted / restored, one column per image: an (H*3, W*n) uint8 grey picture."""
    rows = [torch.cat(list(t[:num_images, 0].float().clamp(0, 1)), dim=1) for t in triple]
    return (torch.cat(rows, dim=0).numpy() * 255).round().astype(np.uint8)


class RestorationImageLogger(L.Callback):
    """After each validation epoch: the first validation batch's originals, corruptions and
    restorations as the TensorBoard image ``val/restoration``; ``restoration.png`` in the run dir
    holds the last one."""

    def __init__(self, png_path: Path, num_images: int = 8):
        self.png_path = png_path
        self.num_images = num_images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        triple = getattr(pl_module, "last_val_triple", None)
        if trainer.sanity_checking or triple is None or not trainer.is_global_zero:
            return
        grid = restoration_grid(triple, self.num_images)
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_image("val/restoration", grid, trainer.global_step, dataformats="HW")
        save_png(grid, self.png_path)


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, RestorationModule, L.Trainer]:
    """Datamodule (as busiseg.train's), restoration module and trainer from the config."""
    resolve_precision(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("augment_on_device"):
        raise ConfigError("augment_on_device=true is not supported by busiseg.pretrain: leave it false")
    datamodule = build_datamodule(cfg)
    try:
        corruption = RestorationCorruption(**cfg.pretrain.corruption)
    except TypeError as exc:
        raise ConfigError(f"pretrain.corruption: {exc}") from exc
    module = RestorationModule(
        net=hydra.utils.instantiate(cfg.model),
        corruption=corruption,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        config=_plain(cfg),
        channels_last=bool(cfg.get("channels_last", False)),
        val_seed=int(cfg.seed or 0),
    )
    module.nonfinite = str((cfg.get("guard") or {}).get("nonfinite", "stop"))
    trainer = build_trainer(cfg, [RestorationImageLogger(output_dir / "restoration.png")])
    return datamodule, module, trainer


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Fit the restoration task; write metrics.json; return it."""
    if cfg.get("init_weights"):
        raise ConfigError("init_weights is a busiseg.train option; busiseg.pretrain starts from model.encoder_weights")
    if cfg.get("mix"):
        raise ConfigError("mix is a busiseg.train option (Mixup/CutMix of labelled batches); busiseg.pretrain "
                          "corrupts images with pretrain.corruption.*: drop the mix override")
    cfg, resumed, output_dir = prepare_run(cfg)
    try:
        datamodule, module, trainer = build(cfg)
    except (InstantiationException, ValueError) as exc:
        cause = exc.__cause__ if isinstance(exc, InstantiationException) else exc
        if isinstance(cause, EncoderWeightsUnavailable):
            raise cause from None  # its own one-line message, not Hydra's wrapping of it
        if not isinstance(cause, ValueError) or isinstance(cause, DatasetError):
            raise
        raise ConfigError(str(cause).strip()) from exc
    if trainer.is_global_zero:
        record_run(output_dir, _plain(cfg), resumed=resumed)
    started = time.perf_counter()
    fit_or_raise_interrupted(trainer, module, datamodule, cfg.get("ckpt_path"), output_dir, "busiseg.pretrain")
    weights = output_dir / "checkpoints" / "last.ckpt"
    summary = {
        "task": "pretrain",  # busiseg.cv_summary leaves such runs out
        "metrics": {**_scalars(trainer.callback_metrics, "val/"), **_scalars(trainer.callback_metrics, "train/")},
        "weights": str(weights) if weights.is_file() else None,  # none under fast_dev_run
        "epochs_trained": trainer.current_epoch,
        "fit_seconds": round(time.perf_counter() - started, 2),
        "images_per_split": {
            p: summarize([datamodule.records[i] for i in getattr(datamodule, f"{p}_dataset").indices]) for p in PARTS
        },
        "data_root": str(datamodule.root),
    }
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", summary)
        log.info("restoration loss: %s", {k: round(v, 5) for k, v in summary["metrics"].items()})
        if summary["weights"]:
            log.info("fine-tune from it with the same data and split: python -m busiseg.train <same overrides> "
                     "init_weights=%s", weights)
    return summary


@entry_point("busiseg.pretrain", CONFIG_DIR, "pretrain")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = pretrain(cfg)
    except (DatasetError, ConfigError, EncoderWeightsUnavailable) as exc:
        fail(log, exc, 2, prog="busiseg.pretrain")
    except NonFiniteLossError as exc:
        fail(log, exc, 1, prog="busiseg.pretrain")
    except TrainingInterrupted as exc:
        fail(log, exc, 128 + exc.signum, prog="busiseg.pretrain", prefix="", level=logging.WARNING)
    value = summary["metrics"].get("val/restore_loss")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()

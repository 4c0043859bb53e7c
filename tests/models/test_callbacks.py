"""Tests for the prediction pictures (reporting) and the ValidationImageLogger callback."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from busiseg.models.callbacks import ValidationImageLogger
from busiseg.models.reporting import (
    PRED_COLOR,
    TRUE_COLOR,
    contour,
    overlay_mask,
    render_prediction_grid,
    save_png,
)


def _disc(h: int, w: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


# --------------------------------------------------------------------------- reporting
def test_contour_is_the_inner_boundary():
    m = np.zeros((9, 9), bool)
    m[2:7, 2:7] = True
    c = contour(m, 1)
    assert c[2, 2:7].all() and c[6, 2:7].all() and c[2:7, 2].all() and c[2:7, 6].all()
    assert not c[3:6, 3:6].any() and not c[~m].any()
    assert contour(m, 2)[3, 3] and not contour(m, 2)[4, 4]


def test_overlay_mask_colours_true_contour_green_and_prediction_red():
    h = w = 64
    img = np.full((h, w), 0.5, np.float32)
    true = _disc(h, w, 20, 20, 10)
    pred = _disc(h, w, 44, 44, 10)
    out = overlay_mask(img, true, pred, thickness=1)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8

    edge = contour(true, 1)
    assert np.array_equal(out[edge], np.broadcast_to(TRUE_COLOR.astype(np.uint8), out[edge].shape))
    assert np.all(out[20, 20] == 128)  # inside the true lesion: untouched grey

    r, g, b = (out[pred].astype(int)[:, k] for k in range(3))
    assert np.all(r > g + 40) and np.all(r > b)  # red-ish where predicted (fill and outline)
    assert np.array_equal(out[44, 44 - 10], PRED_COLOR.astype(np.uint8))  # pred outline, solid

    background = ~(true | pred)
    assert np.all(out[background] == 128)


def test_overlay_mask_accepts_empty_or_missing_masks_and_channel_first():
    img = np.random.default_rng(0).random((1, 32, 40)).astype(np.float32)
    out = overlay_mask(img, np.zeros((1, 32, 40)), None)
    assert out.shape == (32, 40, 3)
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])  # plain grey
    with pytest.raises(ValueError):
        overlay_mask(img, np.zeros((16, 16)), None)


def test_render_prediction_grid_three_images():
    rng = np.random.default_rng(0)
    images = [rng.random((64, 64)).astype(np.float32) for _ in range(3)]
    true = [_disc(64, 64, 30, 30, 12), np.zeros((64, 64), bool), _disc(64, 64, 20, 40, 8)]
    pred = [_disc(64, 64, 32, 28, 11), np.zeros((64, 64), bool), np.zeros((64, 64), bool)]
    probs = rng.dirichlet(np.ones(3), size=3)
    grid = render_prediction_grid(images, true, pred, [1, 0, 2], probs.argmax(1), probs, ncols=4)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    h, w = grid.shape[:2]
    # 3 panels in one row at ~3 in / 80-100 dpi each, plus a title and a legend line.
    assert 600 <= w <= 1300 and 200 <= h <= 600 and w > h
    assert grid.std() > 10  # actually drew something
    # The green outline and red prediction survive into the rendered figure.
    px = grid.reshape(-1, 3).astype(int)
    assert np.any((px[:, 1] > 180) & (px[:, 0] < 80) & (px[:, 2] < 80))
    assert np.any((px[:, 0] > 180) & (px[:, 1] < 80))


def test_save_png_is_atomic_and_readable(tmp_path: Path):
    arr = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    path = tmp_path / "sub" / "x.png"
    save_png(arr, path)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), arr)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp file left behind


# --------------------------------------------------------------------------- callback
class _FakeDataset(Dataset):
    def __init__(self, n: int = 6, size: int = 32, channels: int = 1, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, channels, size, size, generator=g)
        self.masks = torch.zeros(n, 1, size, size)
        for i in range(n):
            if i % 3:  # normal (label 0) samples have an empty mask
                self.masks[i, 0, 8 : 8 + 4 * (i % 3) + 6, 10:22] = 1.0
        self.labels = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i], "label": self.labels[i], "index": torch.tensor(i)}


class _FakeDataModule(lightning.LightningDataModule):
    def __init__(self, channels: int = 1):
        super().__init__()
        self.train_dataset = _FakeDataset(8, channels=channels, seed=1)
        self.val_dataset = _FakeDataset(6, channels=channels, seed=2)

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=4)

    def val_dataloader(self):
        return DataLoader(self.val_dataset, batch_size=4)


class _FakeModule(lightning.LightningModule):
    def __init__(self, channels: int = 1):
        super().__init__()
        self.mask_head = nn.Conv2d(channels, 1, kernel_size=1)
        self.norm = nn.BatchNorm2d(channels)
        self.cls_head = nn.Linear(channels, 3)

    def forward(self, images):
        x = self.norm(images)
        return self.mask_head(x), self.cls_head(x.mean(dim=(2, 3)))

    def _loss(self, batch):
        mask_logits, class_logits = self(batch["image"])
        return nn.functional.binary_cross_entropy_with_logits(mask_logits, batch["mask"]) + nn.functional.cross_entropy(
            class_logits, batch["label"]
        )

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_validation_image_logger_writes_png_and_tensorboard_image(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    callback = ValidationImageLogger(num_images=4)
    trainer = lightning.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        logger=logger,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(_FakeModule(), datamodule=_FakeDataModule())

    log_dir = Path(logger.log_dir)
    pngs = sorted((log_dir / "val_predictions").glob("*.png"))
    assert [p.name for p in pngs] == ["epoch_000.png"]  # nothing from the sanity check
    picture = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 400
    assert callback._indices == [0, 2, 3, 5]  # evenly spaced over the 6 validation samples

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert "val/predictions" in events.Tags()["images"]
    (image_event,) = events.Images("val/predictions")
    (loss_event,) = events.Scalars("val/loss")
    assert image_event.step == loss_event.step == 1  # beside the epoch's scalars (global_step is 2 by then)
    assert (image_event.width, image_event.height) == (picture.shape[1], picture.shape[0])


def _fake_trainer(tmp_path: Path, datamodule, **overrides) -> SimpleNamespace:
    fields = dict(
        sanity_checking=False,
        is_global_zero=True,
        current_epoch=0,
        global_step=10,
        loggers=[],
        datamodule=datamodule,
        default_root_dir=str(tmp_path),
        state=SimpleNamespace(fn=TrainerFn.FITTING),  # during a fit (not a validation after it)
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_callback_restores_modes_and_handles_rgb_without_logger(tmp_path: Path):
    module = _FakeModule(channels=3)
    module.train()
    module.norm.eval()  # e.g. a frozen submodule: must stay as it was
    callback = ValidationImageLogger(num_images=10)  # more than the dataset holds
    trainer = _fake_trainer(tmp_path, _FakeDataModule(channels=3), current_epoch=4)

    callback.on_validation_epoch_end(trainer, module)

    assert module.training and module.mask_head.training and not module.norm.training
    assert callback.last_png_path == tmp_path / "val_predictions" / "epoch_004.png"
    assert callback.last_png_path.is_file()
    assert callback._indices == list(range(6))


@pytest.mark.parametrize(
    "overrides",
    [dict(sanity_checking=True), dict(is_global_zero=False), dict(current_epoch=0),
     dict(state=SimpleNamespace(fn=TrainerFn.VALIDATING))],
    ids=["sanity-check", "not-rank-0", "not-every-n-epochs", "validating-after-the-fit"],
)
def test_callback_skips(tmp_path: Path, overrides):
    callback = ValidationImageLogger(num_images=2, every_n_epochs=2)
    trainer = _fake_trainer(tmp_path, _FakeDataModule(), **{"current_epoch": 1, **overrides})
    callback.on_validation_epoch_end(trainer, _FakeModule())
    assert not (tmp_path / "val_predictions").exists()
    # the control: the same callback, the same trainer but for the one override, writes (epoch 2 of every 2)
    callback.on_validation_epoch_end(_fake_trainer(tmp_path, _FakeDataModule(), current_epoch=1), _FakeModule())
    assert [p.name for p in (tmp_path / "val_predictions").iterdir()] == ["epoch_001.png"]


def test_select_indices_even_and_deterministic():
    cb = ValidationImageLogger(num_images=4)
    assert cb.select_indices(10) == [0, 3, 6, 9]
    assert cb.select_indices(3) == [0, 1, 2]
    assert cb.select_indices(0) == []
    with pytest.raises(ValueError):
        ValidationImageLogger(num_images=0)


def test_epoch_summary_times_an_epoch_resumed_midway_from_the_fit_start(caplog):
    """Lightning skips on_train_epoch_start for an epoch resumed mid-way: its time counted from 0 (the machine's
    uptime was printed)."""
    from busiseg.models.callbacks import EpochSummary

    callback = EpochSummary()
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=1, max_epochs=3,
                              callback_metrics={"val/dice": torch.tensor(0.5)})
    callback.on_train_start(trainer, None)  # then straight to the epoch's end, as after a mid-epoch resume
    with caplog.at_level("INFO", logger="busiseg.train"):
        callback.on_train_epoch_end(trainer, None)
    seconds = int(caplog.text.split("epoch 2/3 (")[1].split(" s)")[0])
    assert seconds < 60, caplog.text


def test_epoch_summary_names_the_kept_checkpoint_of_the_same_best(caplog, tmp_path):
    """The log counts epochs from 1 and checkpoint files from 0 (Lightning's epoch_002.ckpt is epoch 3): the best
    names the file a checkpoint callback keeps for the same best (formatted, since that callback saves after the
    summary), and nothing where it keeps another metric's best or its name needs values the summary lacks."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from busiseg.models.callbacks import EpochSummary

    same = ModelCheckpoint(dirpath=tmp_path, filename="epoch_{epoch:03d}", monitor="val/dice", mode="max",
                           auto_insert_metric_name=False)
    other = ModelCheckpoint(dirpath=tmp_path, filename="epoch_{epoch:03d}", monitor="val/loss", mode="min")
    by_step = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}", monitor="val/dice", mode="max")
    for callbacks, shown in (([other, same], "(epoch 3, epoch_002.ckpt)"), ([other], "(epoch 3)"),
                             ([by_step], "(epoch 3)")):
        callback = EpochSummary()
        trainer = SimpleNamespace(is_global_zero=True, current_epoch=2, max_epochs=3, checkpoint_callbacks=callbacks,
                                  callback_metrics={"val/dice": torch.tensor(0.5)})
        caplog.clear()
        with caplog.at_level("INFO", logger="busiseg.train"):
            callback.on_train_epoch_end(trainer, None)
        assert caplog.text.rstrip().endswith("best val/dice 0.5000 " + shown), caplog.text

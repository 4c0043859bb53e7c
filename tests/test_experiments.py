"""The experiment presets (conf/experiment) and what they promise: a fixed schedule whose last
weights are tested, so nothing that saw the validation fold picks the model."""

from __future__ import annotations

import json

import pytest
from hydra.utils import instantiate

from busiseg.train import ConfigError, check_config, train
from tests.test_train import compose_train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exp_data")


@pytest.mark.parametrize("name", ["busi", "busi_cpu", "busi_gpu"])
def test_experiment_presets_compose(tmp_path, data_dir, name, monkeypatch):
    monkeypatch.setenv("BUSI_ROOT", str(tmp_path / "busi"))
    cfg = compose_train(tmp_path, data_dir, [f"experiment={name}", "split=kfold", "split.fold=4"], fast=False)
    assert cfg.data._target_.endswith("BusiDataModule") and cfg.data.root == str(tmp_path / "busi")
    assert cfg.split.fold == 4 and cfg.model.encoder_weights is None
    if name != "busi":
        assert cfg.test_ckpt == "last" and cfg.callbacks.early_stopping is None
        assert type(instantiate(cfg.loss)).__name__ == "MultiTaskLoss"
    if name == "busi_cpu":  # the measured recipe (docs/results.md)
        assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "auto" and cfg.channels_last
        assert cfg.augment._target_.endswith("standard_recipe") and cfg.data.image_size == 128
        assert cfg.augment.affine_p == 0.8 and cfg.augment.brightness == 0.35  # augment=strong (e33)
        assert cfg.scheduler._target_.endswith("one_cycle") and cfg.model.encoder_name == "resnet34"
        assert cfg.loss.segmentation.dice_reduction == "lesion_images"  # e19
        assert cfg.crop_stage.epochs == 40 and list(cfg.crop_stage.test_margins) == [1.5, 2.0, 2.5]  # e49/e50
        # the refine stage's settings are RefinerSettings' defaults, the e54 probe's
        assert cfg.refine_stage.blend == "replace" and cfg.refine_stage.seed is None
        from busiseg.models.mask_refiner import RefinerSettings
        from busiseg.train import refine_settings

        assert refine_settings(cfg) == RefinerSettings(seed=42 + 4)  # the run's seed + its fold
        # the scan stage (e67/e68): ScanSettings' defaults, the probe's, seeded like the refine stage
        from busiseg.models.scan_classifier import ScanSettings
        from busiseg.train import scan_settings

        assert cfg.scan_stage.size == 224 and scan_settings(cfg) == ScanSettings(seed=42 + 4)
    if name == "busi_gpu":
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.data.image_size == 256 and cfg.trainer.max_epochs > 30
        # busi_cpu's augment=strong and per-lesion-image Dice, as measured on the GPU (g02)
        assert cfg.loss.segmentation.dice_reduction == "lesion_images"
        assert cfg.augment.affine_p == 0.8 and cfg.augment.brightness == 0.35
        assert cfg.optimizer.lr == 1.4e-3 and cfg.data.batch_size == 32 and cfg.channels_last


def test_test_ckpt_last_tests_the_final_weights(tmp_path, data_dir):
    # the "best" checkpoint made deliberately different from the last weights: the highest val loss
    worst = ["callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=max"]
    # step checkpoints every 5 steps (4 steps per epoch): the last one (step 10) comes before the
    # fit ends (step 12), as on real data where the last step is rarely a multiple of 200
    fit = train(compose_train(tmp_path / "a", data_dir, ["trainer.max_epochs=3", "test_ckpt=last",
                                                         "callbacks.image_logger=null", *worst,
                                                         "callbacks.step_checkpoint.every_n_train_steps=5"]))
    assert fit["tested_checkpoint"] == "last"
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    again = train(compose_train(tmp_path / "b", data_dir, ["train=false", f"ckpt_path={last}"]))
    for key in ("test/dice", "test/accuracy", "test/loss"):
        assert again["metrics"][key] == pytest.approx(fit["metrics"][key], abs=1e-6), key
    best = json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())["best_checkpoint"]
    assert best and not best.endswith("epoch_002.ckpt")
    # last.ckpt is the state the fit ended with (Lightning's save_last would have kept the best epoch's)
    import torch

    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["global_step"] == 3 * 4, (state["epoch"], state["global_step"])
    other = train(compose_train(tmp_path / "c", data_dir, ["train=false", f"ckpt_path={best}"]))
    assert other["metrics"]["test/loss"] != pytest.approx(fit["metrics"]["test/loss"], abs=1e-6)


def test_test_ckpt_must_be_best_or_last(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="test_ckpt"):
        check_config(compose_train(tmp_path, data_dir, ["test_ckpt=final"]))


@pytest.mark.parametrize("override, message", [
    ("data.image_size=64.5", r"data\.image_size must be a whole number, got 64\.5"),
    ("trainer.max_epochs=-5", r"trainer\.max_epochs must be >= 1 \(or -1: until stopped\), got -5"),
    ("optimizer.lr=-1", r"optimizer\.lr must be a number > 0, got -1"),
    ("data.cache=foo", r"data\.cache must be one of memory, disk, none, got 'foo'"),
])
def test_out_of_range_training_values_are_refused_before_any_work(tmp_path, data_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train(tmp_path, data_dir, [override]))


def test_metrics_json_reports_the_kept_checkpoints_validation_scores(tmp_path, data_dir, caplog):
    """With test_ckpt=best the kept checkpoint is an earlier epoch's (here: the highest val loss, so not the
    last): metrics.json, and so the value a sweeper optimises, hold its val/* scores, not the last epoch's;
    TensorBoard's curves keep one point per epoch, and the HPARAMS metrics sit apart under hparams/."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    worst = ["callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=max"]
    with caplog.at_level("INFO", logger="busiseg.train"):
        fit = train(compose_train(tmp_path, data_dir, ["trainer.max_epochs=3", "test_ckpt=best", *worst]))
    # one line per epoch, with that epoch's losses and scores and the best val/dice so far
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(" (")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train/loss " in line and "val/dice " in line and "best val/dice" in line for line in lines)
    best = fit["best_checkpoint"]
    assert best and not best.endswith("epoch_002.ckpt")
    state = torch.load(best, map_location="cpu", weights_only=True)
    kept = next(v["best_model_score"] for k, v in state["callbacks"].items()
                if k.startswith("ModelCheckpoint") and "'monitor': 'val/loss'" in k)
    assert fit["metrics"]["val/loss"] == pytest.approx(float(kept), abs=1e-6)
    curves: dict[str, list[int]] = {}
    for event_file in (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            curves.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    assert len(curves["val/loss"]) == 3 and 0 not in curves["val/loss"]  # an epoch's point each, none at step 0
    assert "hparams/test/dice" in curves and "hparams/val/dice" in curves
    assert len(list((tmp_path / "run" / "tensorboard" / "val_predictions").glob("epoch_*.png"))) == 3

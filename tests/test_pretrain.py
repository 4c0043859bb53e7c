"""python -m busiseg.pretrain and busiseg.train init_weights=...: self-supervised pretraining by restoration
on the phantom, the fine-tune from it, and the checks that keep a cross-validation leak-free."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from busiseg.checkpoint import TRAINED_ON_KEY, CheckpointError
from busiseg.cv_summary import find_fold_runs
from busiseg.pretrain import pretrain
from busiseg.train import ConfigError, build, train
from tests.conftest import REPO
from tests.test_train import FAST

KFOLD = ["split=kfold", "split.k=3", "debug=limit"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def _compose(config_name: str, tmp_path: Path, data_dir: Path, run: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name, return_hydra_config=True, overrides=FAST + overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.data_dir = str(data_dir)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / run)
        cfg.hydra.runtime.output_dir = str(tmp_path / run)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir) -> Path:
    """A fold-0 pretraining run on the phantom (2 short epochs)."""
    tmp = tmp_path_factory.mktemp("pre")
    summary = pretrain(_compose("pretrain", tmp, data_dir, "pre", [*KFOLD, "split.fold=0"]))
    assert summary["task"] == "pretrain"
    return tmp / "pre"


def test_pretrain_writes_weights_curves_and_the_images_it_saw(pretrained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["task"] == "pretrain" and metrics["epochs_trained"] == 2
    assert 0 < metrics["metrics"]["val/restore_loss"] < 1
    assert (pretrained / "restoration.png").stat().st_size > 0
    ckpt = torch.load(pretrained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    split = json.loads((pretrained / "split.json").read_text())  # names relative to the data root
    assert ckpt[TRAINED_ON_KEY] == sorted(split["train"]) and not set(split["val"]) & set(split["train"])
    # the class head is never trained by the restoration task: still its zero initialisation
    head = [v for k, v in ckpt["state_dict"].items() if k.startswith("net.unet.classification_head")]
    assert head and all(float(v.abs().sum()) == 0 for v in head)
    assert ckpt["hyper_parameters"]["config"]["model"]["encoder_name"] == "resnet18"
    acc = EventAccumulator(str(next((pretrained / "tensorboard").glob("events.out.tfevents.*"))),
                           size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {"train/restore_loss_epoch", "val/restore_loss"} <= set(acc.Tags()["scalars"])
    assert "val/restoration" in acc.Tags()["images"]
    # busiseg.cv_summary does not count the pretraining run as a fold
    assert find_fold_runs(pretrained.parent) == []


def test_init_weights_loads_the_pretrained_network_and_trains_on_the_same_fold(pretrained, tmp_path, data_dir, caplog):
    weights = pretrained / "checkpoints" / "last.ckpt"
    cfg = _compose("train", tmp_path, data_dir, "ft", [*KFOLD, "split.fold=0", f"init_weights={weights}"])
    _, module, _ = build(cfg)
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    state = module.net.state_dict()
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(state[key.removeprefix("net.")], value), key
    with caplog.at_level("INFO", logger="busiseg.checkpoint"):
        summary = train(_compose("train", tmp_path, data_dir, "ft", [*KFOLD, "split.fold=0", f"init_weights={weights}"]))
    n = len(ckpt[TRAINED_ON_KEY])
    assert f"network weights loaded; none of this run's validation or test images is among the {n} images" in caplog.text
    # its own checkpoint lists its training images too (a later init_weights from it is checked the same way)
    ft = torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ft[TRAINED_ON_KEY] == ckpt[TRAINED_ON_KEY]


def test_init_weights_refuses_a_fold_whose_images_were_pretrained_on(pretrained, tmp_path, data_dir):
    weights = pretrained / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"was trained on \d+ of this run's \d+ val images"):
        train(_compose("train", tmp_path, data_dir, "leak", [*KFOLD, "split.fold=1", f"init_weights={weights}"]))


def test_init_weights_names_the_model_keys_that_differ(pretrained, tmp_path, data_dir):
    weights = pretrained / "checkpoints" / "last.ckpt"
    cfg = _compose("train", tmp_path, data_dir, "other", [*KFOLD, "split.fold=0", f"init_weights={weights}",
                                                           "model.encoder_name=resnet34"])
    with pytest.raises(CheckpointError, match=r"model.encoder_name='resnet18' \(this run: 'resnet34'\)"):
        build(cfg)
    cfg = _compose("train", tmp_path, data_dir, "none", [f"init_weights={tmp_path / 'missing.ckpt'}"])
    with pytest.raises(CheckpointError, match="missing.ckpt: checkpoint not found"):
        build(cfg)


def test_pretrain_config_errors_name_the_key(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="pretrain.corruption.curve_p"):
        pretrain(_compose("pretrain", tmp_path, data_dir, "bad", ["pretrain.corruption.curve_p=2"]))
    with pytest.raises(ConfigError, match="pretrain.corruption: .*unexpected keyword"):
        pretrain(_compose("pretrain", tmp_path, data_dir, "bad2", ["+pretrain.corruption.nope=1"]))
    with pytest.raises(ConfigError, match="init_weights is a busiseg.train option"):
        pretrain(_compose("pretrain", tmp_path, data_dir, "bad3", ["init_weights=x.ckpt"]))
    with pytest.raises(ConfigError, match="mix is a busiseg.train option"):
        pretrain(_compose("pretrain", tmp_path, data_dir, "bad4", ["mix=mixup"]))

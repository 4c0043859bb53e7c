"""End-to-end runs through Hydra's compose with the real conf/ tree, as a user's command line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from busiseg.train import ConfigError, check_config, train
from tests.conftest import REPO

# small and fast: a resnet18 U-Net with thin decoder at 64 px on a 22-image phantom
FAST = [
    "data.image_size=64",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.synthetic.n_per_class.benign=8",
    "data.synthetic.n_per_class.malignant=8",
    "data.synthetic.n_per_class.normal=6",
    "model.encoder_name=resnet18",
    "model.decoder_channels=[32,16,16,8,8]",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def compose_train(tmp_path: Path, data_dir: Path, overrides: list[str], fast: bool = True):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=(FAST if fast else []) + overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.data_dir = str(data_dir)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.mark.parametrize("loss", ["fixed", "uncertainty", "seg_only", "cls_only"])
def test_every_loss_config_instantiates_and_backpropagates(tmp_path, data_dir, loss):
    cfg = compose_train(tmp_path, data_dir, [f"loss={loss}"])
    criterion = instantiate(cfg.loss)
    net = instantiate(cfg.model)
    images = torch.rand(2, 1, 64, 64)
    masks = (torch.rand(2, 1, 64, 64) > 0.7).float()
    out = criterion(*net(images), masks, torch.tensor([0, 2]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    head_grad = [p.grad for p in net.unet.classification_head.parameters()]
    if loss == "seg_only":
        assert all(g is None or g.abs().sum() == 0 for g in head_grad)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in head_grad)
    decoder_grad = [p.grad for p in net.unet.decoder.parameters()]
    if loss == "cls_only":  # the same encoder and head, nothing trains the decoder
        assert all(g is None or g.abs().sum() == 0 for g in decoder_grad)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in decoder_grad)


@pytest.mark.parametrize("loss", ["fixed", "uncertainty", "seg_only", "cls_only"])
def test_class_weights_are_a_key_of_every_loss_config(tmp_path, data_dir, loss):
    cfg = compose_train(tmp_path, data_dir, [f"loss={loss}", "loss.classification.class_weights=[2,1,1.5]"])
    assert instantiate(cfg.loss).classification.class_weights.tolist() == [2.0, 1.0, 1.5]


def test_fast_dev_run_writes_metrics_and_split(tmp_path, data_dir):
    cfg = compose_train(tmp_path, data_dir, ["debug=fdr"])
    summary = train(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metrics"] == summary["metrics"]
    assert 0.0 <= metrics["metrics"]["test/dice"] <= 1.0
    split = json.loads((run / "split.json").read_text())
    confusion = torch.tensor(metrics["test_confusion_matrix"])
    assert confusion.shape == (3, 3) and int(confusion.sum()) == len(split["test"])  # every test image once
    assert sum(len(split[p]) for p in ("train", "val", "test")) == 22
    assert not set(split["train"]) & set(split["test"])
    assert (data_dir / "phantom" / ".busiseg_phantom.json").exists()


def test_short_run_checkpoint_tensorboard_and_hparams(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_train(tmp_path, data_dir, ["debug=limit"])
    summary = train(cfg)
    run = tmp_path / "run"
    best = Path(summary["best_checkpoint"])
    assert best.exists() and (run / "checkpoints" / "last.ckpt").exists()
    ckpt = torch.load(best, map_location="cpu", weights_only=True)  # no pickled objects
    assert ckpt["hyper_parameters"]["config"]["model"]["encoder_name"] == "resnet18"
    tags: dict[str, list[str]] = {"scalars": [], "images": [], "hparams": []}
    for event_file in (run / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        acc.Reload()
        for kind in ("scalars", "images"):
            tags[kind] += acc.Tags().get(kind, [])
        try:
            tags["hparams"] += list(acc.PluginTagToContent("hparams"))
        except KeyError:
            pass
    assert {"val/dice", "train/loss_epoch", "val/accuracy", "test/dice"} <= set(tags["scalars"])
    assert "val/predictions" in tags["images"]
    # the HPARAMS tab: hyperparameters paired with the final metrics
    assert "_hparams_/session_start_info" in tags["hparams"]
    assert list((run / "tensorboard" / "val_predictions").glob("epoch_*.png"))


def test_ema_callbacks_save_and_test_the_averaged_weights(tmp_path, data_dir):
    from busiseg.checkpoint import load_model

    cfg = compose_train(tmp_path, data_dir, ["debug=limit", "callbacks=ema", "callbacks.image_logger=null",
                                             "logger=csv", "test_ckpt=last"])
    assert cfg.callbacks.ema.decay == 0.99 and cfg.callbacks.last_checkpoint is not None
    train(cfg)
    run = tmp_path / "run"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # state_dict holds the average (what eval, predict and export load); the raw weights ride along for resuming
    assert "current_model_state" in ckpt and "averaging_state" in ckpt
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if k.startswith("net."))
    net, _ = load_model(run / "checkpoints" / "last.ckpt")
    name, value = next((k, v) for k, v in averaged.items() if k.startswith("net.") and v.is_floating_point())
    assert torch.equal(net.state_dict()[name.removeprefix("net.")], value)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["tested_checkpoint"] == "last" and "test/dice" in summary["metrics"]


def test_overfit_few_batches_loss_falls(tmp_path, data_dir):
    cfg = compose_train(tmp_path, data_dir, ["debug=overfit", "logger=csv", "trainer.max_epochs=15",
                                             "callbacks.image_logger=null", "test=false",
                                             "optimizer.lr=3e-3", "scheduler=none"])
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(losses) == 15
    assert losses[-1] < 0.6 * losses[0], losses


def test_bad_config_values_named(tmp_path, data_dir):
    cfg = compose_train(tmp_path, data_dir, ["data.image_size=100"])
    with pytest.raises(ConfigError, match="data.image_size"):
        train(cfg)
    cfg = compose_train(tmp_path, data_dir, ["trainer.precision=8"])
    with pytest.raises(ConfigError, match="trainer.precision"):
        train(cfg)
    cfg = compose_train(tmp_path, data_dir, ["data=busi", "data.root=null"], fast=False)
    with pytest.raises(ConfigError, match="data.root"):
        train(cfg)
    cfg = compose_train(tmp_path, data_dir, ["mix=cutmix", "mix.p=2"])
    with pytest.raises(ConfigError, match=r"mix\.p must be in \[0, 1\], got 2"):
        train(cfg)
    cfg = compose_train(tmp_path, data_dir, ["train=false", "test=false"])  # was an AttributeError traceback
    with pytest.raises(ConfigError, match="train=false test=false: nothing to do"):
        train(cfg)


def test_a_run_without_a_logger_trains(tmp_path, data_dir, caplog):
    """``~logger``: the learning-rate monitor, which refuses a trainer without a logger, is left out (it ended in
    Lightning's MisconfigurationException after the data was read)."""
    with caplog.at_level("INFO", logger="busiseg.train"):
        summary = train(compose_train(tmp_path, data_dir, ["~logger"]))
    assert "no logger: callbacks.lr_monitor (a learning-rate monitor) is off" in caplog.text
    assert "test/dice" in summary["metrics"] and not (tmp_path / "run" / "tensorboard").exists()
    # the epoch lines count from 1, the checkpoint files from 0: the best names the file that holds it
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")][-1]
    assert summary["best_checkpoint"] and last.endswith(f", {Path(summary['best_checkpoint']).name})"), last


def test_kfold_warns_when_the_test_fold_picks_the_checkpoint(tmp_path, data_dir, caplog):
    with caplog.at_level("WARNING", logger="busiseg.train"):
        check_config(compose_train(tmp_path, data_dir, ["split=kfold"]))
    assert "test_ckpt=best picks the checkpoint by val/dice on the images it then scores" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="busiseg.train"):
        check_config(compose_train(tmp_path, data_dir, ["split=kfold", "test_ckpt=last"]))
        check_config(compose_train(tmp_path, data_dir, ["split=kfold", "split.test_fraction=0.2"]))
        check_config(compose_train(tmp_path, data_dir, []))  # holdout: a test part of its own
    assert "picks the checkpoint" not in caplog.text


def test_cpu_bf16_warns_only_without_native_bfloat16(tmp_path, data_dir, monkeypatch, caplog):
    import busiseg.train as train_module

    cfg = compose_train(tmp_path, data_dir, ["trainer=cpu", "trainer.precision=bf16-mixed"])
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="busiseg.train"):
        check_config(cfg)
    assert "without bfloat16 instructions" in caplog.text
    caplog.clear()
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="busiseg.train"):
        check_config(cfg)
        check_config(compose_train(tmp_path, data_dir, ["trainer=cpu"]))  # fp32: nothing to say
    assert "bfloat16" not in caplog.text


@pytest.mark.parametrize("flags, onednn, native", [
    ({"avx512f", "avx512bw", "avx512vl", "avx512dq"}, True, False),  # Skylake-SP..Ice Lake: oneDNN emulates bf16
    ({"avx512f", "avx512bw", "avx512_bf16"}, True, True),  # Cooper Lake, Zen 4
    ({"avx512bw", "amx_bf16", "amx_tile"}, True, True),  # Sapphire Rapids
    ({"fp", "asimd", "bf16"}, True, True),  # Arm with BF16 (Features)
    ({"avx2", "fma"}, False, False),
    (None, True, True),  # no /proc/cpuinfo (macOS...): oneDNN's answer
    (None, False, False),
])
def test_native_bf16_needs_the_instructions_not_only_onednn(flags, onednn, native):
    from busiseg.run_info import native_bf16

    assert native_bf16(None if flags is None else frozenset(flags), onednn) is native


def test_cpu_flags_read_from_proc_cpuinfo():
    from busiseg.run_info import cpu_flags

    flags = cpu_flags()
    if Path("/proc/cpuinfo").is_file():
        assert flags and ({"fpu", "sse2"} <= flags or "fp" in flags)  # x86 or Arm
    else:
        assert flags is None


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_is_bf16_only_where_native(tmp_path, data_dir, monkeypatch, caplog, native):
    import busiseg.train as train_module

    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: native)
    cfg = compose_train(tmp_path, data_dir, ["trainer=cpu", "trainer.precision=auto"])
    with caplog.at_level("INFO", logger="busiseg.train"):
        train_module.resolve_precision(cfg)
        check_config(cfg)
    assert cfg.trainer.precision == ("bf16-mixed" if native else "32")
    assert "emulated" not in caplog.text  # auto never picks the slow emulated bf16
    assert f"trainer.precision=auto: {cfg.trainer.precision} on this CPU" in caplog.text


def test_precision_auto_run_records_what_it_ran_at(tmp_path, data_dir):
    from busiseg.run_info import cpu_has_bf16

    summary = train(compose_train(tmp_path, data_dir, ["debug=fdr", "trainer=cpu", "trainer.precision=auto"]))
    expected = "bf16-mixed" if cpu_has_bf16() else "32"
    run = tmp_path / "run"
    assert OmegaConf.load(run / "config.yaml").trainer.precision == expected  # what busiseg.eval reads
    assert "test/dice" in summary["metrics"]


@pytest.mark.slow
def test_cli_multirun_two_jobs(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "busiseg.train", "-m", "loss=fixed,seg_only", "debug=fdr",
           f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep}"] + FAST
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert "test/dice" in metrics["metrics"]
    assert "loss=seg_only" in (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
    # the module's batch-transfer hook is the design (busiseg/__init__.py): no warning about it on every fit
    assert "on_after_batch_transfer" not in proc.stdout + proc.stderr


def test_cli_bad_dataset_is_one_clear_error(tmp_path):
    root = tmp_path / "empty"
    for c in ("benign", "malignant"):
        (root / c).mkdir(parents=True)
    cmd = [sys.executable, "-m", "busiseg.train", "data=busi", f"data.root={root}", f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "busiseg: error:" in proc.stderr and "normal/" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_deep_supervision_run_trains_the_aux_heads(tmp_path, data_dir):
    from busiseg.train import build

    from busiseg.checkpoint import load_model

    cfg = compose_train(tmp_path, data_dir, ["debug=limit", "model.deep_supervision=2", "channels_last=true",
                                             "callbacks.image_logger=null", "logger=csv", "test_ckpt=last"])
    inits = []
    for _ in range(2):  # seeded as train() seeds: the run's initial aux-head weights, the same each time
        L.seed_everything(cfg.seed, workers=True)
        inits.append([h.weight.detach().clone() for h in build(cfg)[1].net.aux_heads])
    before = inits[0]
    assert all(torch.equal(a, b) for a, b in zip(*inits))
    train(cfg)
    run = tmp_path / "run"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    after = [ckpt["state_dict"][f"net.aux_heads.{k}.weight"] for k in range(2)]
    assert all(b.shape == a.shape and not torch.equal(b, a) for b, a in zip(before, after))
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    assert any(r.get("train/seg_loss_final") for r in rows)
    net, _ = load_model(run / "checkpoints" / "last.ckpt")  # eval / predict / export rebuild it with its heads
    assert len(net.aux_heads) == 2 and len(net(torch.rand(1, 1, 64, 64))) == 2
    assert "test/dice" in json.loads((run / "metrics.json").read_text())["metrics"]


def test_lesion_pooled_class_head_trains_and_reloads(tmp_path, data_dir):
    from busiseg.checkpoint import load_model

    cfg = compose_train(tmp_path, data_dir, ["debug=limit", "model.class_pooling=lesion", "logger=csv",
                                             "callbacks.image_logger=null", "test_ckpt=last"])
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    weight = ckpt["state_dict"]["net.unet.classification_head.linear.weight"]
    assert weight.shape == (3, 512 + 512 + 256 + 1) and weight.abs().sum() > 0  # trained away from its zero init
    net, config = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert config["model"]["class_pooling"] == "lesion" and net.class_pooling == "lesion"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert "test/accuracy" in metrics and "test/dice" in metrics


def test_channels_last_run_matches_default_metrics_keys(tmp_path, data_dir):
    from busiseg.train import build

    cfg = compose_train(tmp_path, data_dir, ["debug=fdr", "channels_last=true"])
    _, module, _ = build(cfg)
    module.setup("fit")
    first_conv = next(m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    summary = train(cfg)
    default = train(compose_train(tmp_path / "default", data_dir, ["debug=fdr"]))
    assert summary["metrics"].keys() == default["metrics"].keys()
    assert 0.0 <= summary["metrics"]["test/dice"] <= 1.0


def test_disk_cache_run(tmp_path, data_dir):
    cfg = compose_train(tmp_path, data_dir, ["debug=fdr", "data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}"])
    train(cfg)
    assert len(list((tmp_path / "cache").glob("*/done.json"))) == 1


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_batches_reach_the_loss_and_only_in_training(tmp_path, data_dir, kind):
    from busiseg.train import build

    cfg = compose_train(tmp_path, data_dir, ["debug=fdr", f"mix={kind}", "mix.p=1"])
    datamodule, module, trainer = build(cfg)
    assert module.batch_mix.kind == kind and module.batch_mix.seed == cfg.seed
    seen = []
    loss_forward = module.loss.forward

    def spy(mask_logits, class_logits, masks, labels, **kwargs):
        seen.append((module.trainer.training, labels.dim(), bool(((masks > 0) & (masks < 1)).any())))
        return loss_forward(mask_logits, class_logits, masks, labels, **kwargs)

    module.loss.forward = spy
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)
    train_calls = [s for s in seen if s[0]]
    assert train_calls and all(dim == 2 for _, dim, _ in train_calls)  # class probabilities in training
    assert all(dim == 1 for training, dim, _ in seen if not training)  # never mixed at validation/test
    assert any(soft for *_, soft in train_calls) == (kind == "mixup")  # Mixup blends masks, CutMix pastes them


def test_augment_on_device_run(tmp_path, data_dir):
    from busiseg.data.device_augment import StandardTensorAugment
    from busiseg.train import build

    cfg = compose_train(tmp_path, data_dir, ["debug=fdr", "augment_on_device=true", "augment=standard"])
    datamodule, module, _ = build(cfg)
    assert datamodule.train_transform is None and isinstance(module.device_augment, StandardTensorAugment)
    calls = []
    real = StandardTensorAugment.__call__

    def counted(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return real(self, *args, **kwargs)

    StandardTensorAugment.__call__ = counted
    try:
        summary = train(cfg)
    finally:
        StandardTensorAugment.__call__ = real
    assert 0.0 <= summary["metrics"]["test/dice"] <= 1.0
    # the module augments its one training batch (fast_dev_run) on the device, and not the validation or test
    # batches (a module that never called it passed before)
    assert calls == [cfg.data.batch_size]


def test_device_resident_run_and_its_config_check(tmp_path, data_dir):
    cfg = compose_train(tmp_path, data_dir, ["debug=fdr", "data.device_resident=true", "augment_on_device=true"])
    assert 0.0 <= train(cfg)["metrics"]["test/dice"] <= 1.0
    cfg = compose_train(tmp_path, data_dir, ["debug=fdr", "data.device_resident=true"])
    with pytest.raises(ConfigError, match="augment_on_device"):
        train(cfg)
    for trainer in (["trainer=ddp_sim"], ["trainer=ddp"], ["trainer=cpu", "+trainer.num_nodes=2"]):
        cfg = compose_train(tmp_path, data_dir, ["data.device_resident=true", "augment_on_device=true", *trainer])
        with pytest.raises(ConfigError, match="one-process option"):
            check_config(cfg)


def test_one_cycle_schedule_spans_the_whole_fit(tmp_path, data_dir):
    """scheduler=one_cycle gets Lightning's exact step count: the fit ends without OneCycleLR's
    'stepped too many times' error, and the learning rate logged at each epoch start is the
    one-cycle value at that step."""
    from busiseg.models.scheduler import one_cycle

    cfg = compose_train(tmp_path, data_dir, ["debug=limit", "trainer.max_epochs=3", "scheduler=one_cycle",
                                             "callbacks.image_logger=null", "logger=csv", "test=false"])
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    logged = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    schedule = one_cycle(reference, total_steps=9)  # 3 epochs x 3 batches (debug=limit)
    expected = []
    for step in range(9):
        if step % 3 == 0:
            expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert logged == pytest.approx(expected, rel=1e-6)


def test_ctrl_c_outside_the_fit_names_the_resume(tmp_path, data_dir, monkeypatch):
    """A KeyboardInterrupt after the fit (a second stage, the test) was a traceback: one line with the resume
    command where the run has a checkpoint, else that there is nothing to resume."""
    import busiseg.train as train_module

    cfg = compose_train(tmp_path, data_dir, [])
    assert "nothing to resume" in train_module.interrupted_outside_fit(cfg)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert train_module.interrupted_outside_fit(cfg).startswith(
        f"interrupted (Ctrl-C); continue with python -m busiseg.train resume={tmp_path / 'run'} ")

    def interrupted(_cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    monkeypatch.setattr(sys, "argv", ["busiseg.train"])
    with pytest.raises(SystemExit) as stop:
        train_module.main.__wrapped__(cfg)
    assert stop.value.code == 130

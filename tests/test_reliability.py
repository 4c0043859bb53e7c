"""Interruption, resume, non-finite losses and config checks (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from busiseg.models.guards import NonFiniteLossError
from busiseg.train import ConfigError, train
from tests.conftest import REPO
from tests.test_train import FAST, compose_train

# 16 training images, batch 4: 4 steps per epoch; last.ckpt every 2 steps
SHORT = ["trainer=cpu", "trainer.deterministic=true", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
         "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "callbacks.early_stopping=null",
         "callbacks.image_logger=null", "callbacks.step_checkpoint.every_n_train_steps=2", "seed=7"]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}


class KillAt(L.Callback):
    """Test helper: a fresh (not resumed) fit sends ``sig`` to itself after optimizer step ``step``."""

    def __init__(self, step: int, sig: str = "SIGKILL"):
        self.step = step
        self.sig = getattr(signal, sig)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.ckpt_path is None and trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)
            if self.sig != signal.SIGKILL:
                time.sleep(0.2)  # let the handler run before the next batch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rdata")


def _cli(tmp_path: Path, data_dir: Path, run: Path, *overrides: str, timeout: int = 300):
    cmd = [sys.executable, "-m", "busiseg.train", f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}",
           f"hydra.run.dir={run}", *FAST, *SHORT, *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout)


def _csv_rows(run: Path) -> list[tuple]:
    """The learning curve in RUN/csv/metrics.csv: (step, epoch, the metrics logged on the row), with the values
    of those a resume reproduces (per-step and validation metrics, learning rate; not the interrupted epoch's
    train/* epoch means, whose metric states are not checkpointed: they cover the batches after the resume)."""
    import csv

    def value(key: str, v: str):
        return "-" if key.startswith("train/") and not key.endswith("_step") else round(float(v), 5)

    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = [(int(r["step"]), r["epoch"], tuple(sorted((k, value(k, v)) for k, v in r.items()
                                                          if v and k not in ("step", "epoch"))))
                for r in csv.DictReader(f)]
    return sorted(rows)


def _tb_steps(folder: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # purges orphaned (pre-restart) events
    acc.Reload()
    # sorted: the order event files are read in is not the claim; the multiset of steps is
    # (equal lists = no step logged twice, none lost)
    return {tag: sorted(e.step for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.parametrize("callbacks", ["default", "ema"])  # ema: the weight average is restored too
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, data_dir, callbacks):
    # logger=many: TensorBoard and the CSV logger (busi_cpu's), both continued by the resume
    ref_cfg = compose_train(tmp_path / "ref", data_dir, [f"callbacks={callbacks}", "logger=many", *SHORT])
    reference = train(ref_cfg)
    # the epoch-end and the step checkpoint callbacks share one last.ckpt (no last-v1.ckpt that resume would not read)
    assert sorted(p.name for p in (tmp_path / "ref" / "run" / "checkpoints").glob("last*")) == ["last.ckpt"]

    run = tmp_path / "killed"
    killed = _cli(tmp_path, data_dir, run, f"callbacks={callbacks}", "logger=many",
                  "+callbacks.killer._target_=tests.test_reliability.KillAt",
                  "+callbacks.killer.step=3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "metrics.json").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["epoch"] == 0  # mid-epoch: 2 of 4 batches done
    assert not list(run.rglob("*.tmp"))

    resumed = train(compose_train(tmp_path / "r", data_dir, [f"resume={run}"]))
    assert resumed["epochs_trained"] == reference["epochs_trained"]
    ref, got = reference["metrics"], resumed["metrics"]
    assert set(got) == set(ref)
    for key in ref:  # tolerance: exact on CPU with trainer.deterministic=true (see docs/reliability.md)
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    split, ref_split = (json.loads((d / "split.json").read_text()) for d in (run, tmp_path / "ref" / "run"))
    assert all(split[p] == ref_split[p] for p in ("train", "val", "test"))
    # one TensorBoard history: the same steps as the uninterrupted run, none twice, none lost
    assert _tb_steps(run / "tensorboard") == _tb_steps(tmp_path / "ref" / "run" / "tensorboard")
    # and one CSV learning curve: the rows before the checkpoint kept, none twice (Lightning's CSVLogger deleted them)
    assert _csv_rows(run) == _csv_rows(tmp_path / "ref" / "run")
    info = json.loads((run / "run_info.json").read_text())
    assert len(info["resumes"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_save_a_checkpoint_then_resume(tmp_path, data_dir, sig):
    run = tmp_path / "run"
    proc = _cli(tmp_path, data_dir, run, "+callbacks.killer._target_=tests.test_reliability.KillAt",
                "+callbacks.killer.step=3", f"+callbacks.killer.sig={sig}", "callbacks.step_checkpoint=null")
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr[-3000:]
    assert "resume=" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    summary = train(compose_train(tmp_path, data_dir, [f"resume={run}"]))
    assert summary["epochs_trained"] == 2 and (run / "metrics.json").is_file()


def _nan_on_call(monkeypatch, n: int) -> None:
    from busiseg.models import losses

    original = losses.MultiTaskLoss.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == n:
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(losses.MultiTaskLoss, "forward", forward)


def test_nonfinite_loss_stops_naming_step_and_files(tmp_path, data_dir, monkeypatch):
    _nan_on_call(monkeypatch, 4)
    cfg = compose_train(tmp_path, data_dir, SHORT + ["test=false"])
    with pytest.raises(NonFiniteLossError, match=r"global step 3 .*(benign|malignant|normal)/\S+ \(\d+\)\.png"):
        train(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # the last good checkpoint is kept
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_nonfinite_loss_skip_mode_finishes(tmp_path, data_dir, monkeypatch, caplog):
    _nan_on_call(monkeypatch, 2)
    cfg = compose_train(tmp_path, data_dir, SHORT + ["guard.nonfinite=skip", "trainer.max_epochs=1", "test=false"])
    with caplog.at_level("WARNING", logger="busiseg.train"):
        summary = train(cfg)
    assert "batch skipped" in caplog.text
    assert all(v == v for v in summary["metrics"].values())  # no NaN reached the metrics


@pytest.mark.parametrize("override, key", [
    (["loss.weighting.w_seg=-1"], "w_seg"),
    (["split.val_fraction=0.6", "split.test_fraction=0.6"], "fraction"),
    (["split=kfold", "split.fold=5"], "split.fold"),
    (["data.image_size=100"], "data.image_size"),
    (["trainer.precision=8"], "trainer.precision"),
    (["trainer=cpu", "trainer.precision=16-mixed"], "16-mixed"),
    # the default trainer (accelerator auto) on a machine without a GPU: Lightning ran it as bf16-mixed in silence
    pytest.param(["trainer.precision=16-mixed"], "16-mixed",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs 16-mixed")),
    (["guard.nonfinite=ignore"], "guard.nonfinite"),
    (["callbacks.step_checkpoint.every_n_train_steps=0"], "every_n_train_steps"),
])
def test_invalid_config_named_before_heavy_work(tmp_path, data_dir, override, key):
    cfg = compose_train(tmp_path, data_dir, override)
    with pytest.raises(ConfigError, match=key):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_root_and_bad_resume_dir(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="data.root"):
        train(compose_train(tmp_path, data_dir, ["data=busi", "data.root=null"], fast=False))
    with pytest.raises(ConfigError, match="resume="):
        train(compose_train(tmp_path, data_dir, [f"resume={tmp_path / 'nope'}"]))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ConfigError, match="last.ckpt"):
        train(compose_train(tmp_path, data_dir, [f"resume={tmp_path / 'empty_run'}"]))
    (tmp_path / "empty_run" / "checkpoints").mkdir()
    (tmp_path / "empty_run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"last.ckpt: a file; resume= takes the run dir \(resume=.*empty_run\)"):
        train(compose_train(tmp_path, data_dir, [f"resume={tmp_path / 'empty_run' / 'checkpoints' / 'last.ckpt'}"]))


def test_a_resume_after_the_fit_keeps_its_train_metrics_and_fit_time(tmp_path, data_dir, caplog):
    """A kill after the fit (during the test or a second stage: no metrics.json yet), then resume=: the fit runs
    no epoch, and metrics.json had lost every train/* metric and counted only the resume's seconds as the fit's."""
    first = train(compose_train(tmp_path, data_dir, []))
    run = tmp_path / "run"
    (run / "metrics.json").unlink()
    stored = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    seconds = stored["callbacks"]["busiseg.FitClock"]["seconds"]
    assert 0 < seconds <= first["fit_seconds"]  # the time so far, stored with the checkpoint
    with caplog.at_level("INFO"):  # the root logger at INFO, as under Hydra
        resumed = train(compose_train(tmp_path / "again", data_dir, [f"resume={run}"]))
    train_metrics = {k: v for k, v in first["metrics"].items() if k.startswith("train/")}
    assert train_metrics and {k: v for k, v in resumed["metrics"].items() if k.startswith("train/")} == train_metrics
    assert resumed["fit_seconds"] >= seconds
    assert json.loads((run / "metrics.json").read_text())["fit_seconds"] == resumed["fit_seconds"]
    # the run's own train.log goes on (the resumed process's log went only to its own run dir)
    assert "the fit had ended before this resume" in (run / "train.log").read_text()


def test_overrides_beside_resume_are_named_as_ignored(tmp_path, data_dir):
    from busiseg.train import _overrides_beside_resume

    compose_train(tmp_path, data_dir, [f"resume={tmp_path}", "trainer.max_epochs=4", "hydra.job.chdir=false"])
    ignored = _overrides_beside_resume()
    assert "trainer.max_epochs=4" in ignored and not any(o.startswith(("resume=", "hydra.")) for o in ignored)


def test_a_moved_run_dir_resumes_into_itself(tmp_path, data_dir):
    """config.yaml is stored resolved: a run dir moved (or copied) since must not send the resumed checkpoints and
    events to the old place (nor into the original of a copy)."""
    from omegaconf import OmegaConf

    from busiseg.train import _plain, resume_config

    old, new = tmp_path / "run", tmp_path / "project" / "run"  # compose_train makes the run in tmp_path/run
    stored = compose_train(tmp_path, data_dir, [])
    (new / "checkpoints").mkdir(parents=True)
    (new / "checkpoints" / "last.ckpt").write_bytes(b"")
    (new / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(_plain(stored))))  # as record_run writes it
    assert str(old) in (new / "config.yaml").read_text()  # the folders are stored under the old dir
    resumed = resume_config(compose_train(tmp_path, data_dir, [f"resume={new}"]))
    text = OmegaConf.to_yaml(resumed)
    assert str(old) not in text
    assert resumed.callbacks.last_checkpoint.dirpath == str(new / "checkpoints")
    assert resumed.logger.tensorboard.save_dir.startswith(str(new))
    assert resumed.ckpt_path == str(new / "checkpoints" / "last.ckpt") and resumed.paths.output_dir == str(new)
    assert resumed.data.root == stored.data.root  # paths outside the run dir stay


def test_cli_negative_loss_weight_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "busiseg.train", "loss.weighting.w_seg=-1", f"paths.log_dir={tmp_path}",
           f"paths.data_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "busiseg: error:" in proc.stderr and "w_seg" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unreachable_pretrained_weights_is_one_line(tmp_path):
    """model.encoder_weights=imagenet with no Hub to fetch from: busiseg's one line, not Hydra's wrapping of it."""
    env = {**ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub")}
    cmd = [sys.executable, "-m", "busiseg.train", "model.encoder_weights=imagenet", f"paths.log_dir={tmp_path}",
           f"paths.data_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("busiseg: error:")]
    assert len(errors) == 1 and "model.encoder_weights=null" in errors[0] and "not cached" in errors[0]
    assert "Error executing job" not in proc.stderr and "Traceback" not in proc.stderr


def test_csv_written_atomically(tmp_path):
    from busiseg.atomic import write_csv_atomic

    target = tmp_path / "out" / "predictions.csv"
    write_csv_atomic(target, [{"image": "benign (1)", "dice": 0.5, "extra": 1}], ["image", "dice"])
    before = target.read_text()
    assert before.splitlines() == ["image,dice", "benign (1),0.5"]  # header, row; keys outside the columns left out

    def rows():
        yield {"image": "benign (2)", "dice": 0.25}
        raise KeyboardInterrupt  # killed while the rows are produced

    with pytest.raises(KeyboardInterrupt):
        write_csv_atomic(target, rows(), ["image", "dice"])
    assert target.read_text() == before  # the old file is intact, not half a new one
    assert sorted(p.name for p in target.parent.iterdir()) == ["predictions.csv"]


def test_checkpoints_written_atomically(tmp_path, monkeypatch):
    from busiseg.models.guards import AtomicCheckpointIO

    target = tmp_path / "ck" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"a": torch.ones(2)}, target)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"a": torch.zeros(2)}, target)
    assert target.read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary left


@pytest.mark.parametrize("fn, repositioned", [("fit", True), ("test", False), ("validate", False)])
def test_resume_state_repositions_only_a_fit(fn, repositioned, caplog):
    """Testing from the best checkpoint is not a resume: no 'resuming at epoch' and the train sampler is left alone."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from busiseg.models.guards import ResumeState

    saved = ResumeState()
    saved.epoch, saved.batches_done, saved.num_batches = 3, 2, 4
    calls = []
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn(fn)),
                              datamodule=SimpleNamespace(resume_at=lambda *a: calls.append(a)))
    loaded = ResumeState()
    with caplog.at_level("INFO", logger="busiseg.train"):
        loaded.on_load_checkpoint(trainer, None, {"callbacks": {saved.state_key: saved.state_dict()}})
    assert calls == ([(3, 2)] if repositioned else [])
    assert ("resuming at epoch 3" in caplog.text) is repositioned
    assert (loaded._pending_rng is not None) is repositioned


@pytest.mark.parametrize("exact", [True, False])
def test_lightning_not_resumable_warning_only_where_resume_is_inexact(exact):
    """Lightning warns on a mid-epoch resume that the loader "is not resumable" and results may be unreliable.
    The seeded sampler makes it exact (the SIGKILL test above): silenced there, kept for a loader that is not."""
    import warnings
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    from busiseg.models.guards import ResumeState

    saved = ResumeState()
    saved.epoch, saved.batches_done, saved.num_batches = 3, 2, 4
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING),
                              datamodule=SimpleNamespace(resume_at=lambda *a: None, exact_resume=exact))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ResumeState().on_load_checkpoint(trainer, None, {"callbacks": {saved.state_key: saved.state_dict()}})
        # the message Lightning's training_epoch_loop.reset gives (lightning 2.x)
        warnings.warn("You're resuming from a checkpoint that ended before the epoch ended and your dataloader is"
                      " not resumable. This can cause unreliable results if further training is done.",
                      PossibleUserWarning)
    assert any("not resumable" in str(w.message) for w in seen) is not exact


def test_datamodule_resume_is_exact_but_for_its_own_loaders(data_dir):
    from busiseg.data.datamodule import BusiDataModule

    assert BusiDataModule(root=data_dir).exact_resume
    assert not BusiDataModule(root=data_dir, cache="memory", device_resident=True).exact_resume
    assert not BusiDataModule(root=data_dir, num_workers=2, persistent_workers=True).exact_resume
    assert BusiDataModule(root=data_dir, num_workers=2, persistent_workers=False).exact_resume

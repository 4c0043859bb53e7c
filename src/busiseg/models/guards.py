"""Training that survives interruption: atomic checkpoints, exact resume, clean stops, non-finite losses.

- ``AtomicCheckpointIO``: every checkpoint is written to a temporary file beside its
  target, flushed to disk and renamed into place, so a kill never leaves a half-written
  ``.ckpt`` that a later run would trust.
- ``ResumeState``: stores in each checkpoint where the epoch was (batches done) and the
  global RNG states, and on resume tells the datamodule to skip the batches already
  trained on and restores the RNG states before the next batch: a run killed mid-epoch
  and resumed trains on exactly the batches, augmentations and dropout masks the
  uninterrupted run would have (see docs/reliability.md).
- ``GracefulInterrupt``: SIGINT (Ctrl-C) is handled like SIGTERM (cluster pre-emption):
  the current batch finishes, ``checkpoints/last.ckpt`` is saved, and the run stops with
  ``TrainingInterrupted``. A second Ctrl-C stops at once.
- ``check_loss``: a non-finite loss stops the run naming the step and the batch's files
  (``guard.nonfinite=stop``), or skips that batch's optimizer step (``skip``).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.warnings import PossibleUserWarning

log = logging.getLogger("busiseg.train")

NONFINITE_ACTIONS = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the batch's files."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped the fit after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the target folder, fsync, then ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote storage: fsspec's own writes
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


_LIGHTNING_NOT_RESUMABLE = r"You're resuming from a checkpoint that ended before the epoch ended"


class FitClock(L.Callback):
    """The fit's training time across resumes: the seconds before this process (from the checkpoint it resumed,
    where every checkpoint stores the time so far) plus this process's since its fit started. A resumed run's
    ``fit_seconds`` was this process's alone (a few seconds for a resume after the fit had ended)."""

    def __init__(self) -> None:
        self.before = 0.0
        self._started: float | None = None

    @property
    def state_key(self) -> str:
        return "busiseg.FitClock"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._started = time.perf_counter()

    def seconds(self) -> float:
        return self.before + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("seconds", 0.0))


class ResumeState(L.Callback):
    """Position in the epoch and RNG states, saved with every checkpoint and restored on resume.

    Needs a datamodule with ``resume_at(epoch, batches_done)`` (``BusiDataModule``): its
    train sampler is seeded per epoch, so skipping the first batches reproduces the rest.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.batches_done = 0
        self.num_batches = 0
        self._pending_rng: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "busiseg.ResumeState"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # runs before ModelCheckpoint's hook (Lightning orders checkpoint callbacks last)
        self.epoch = trainer.current_epoch
        self.batches_done = batch_idx + 1
        self.num_batches = int(trainer.num_training_batches)

    def state_dict(self) -> dict[str, Any]:
        # RNG states as plain containers: numpy's state tuple holds an ndarray, allowed by weights_only
        np_state = np.random.get_state()
        rng = _rng_states()
        rng["numpy"] = [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]
        rng["python"] = [rng["python"][0], list(rng["python"][1]), rng["python"][2]]
        return {"epoch": self.epoch, "batches_done": self.batches_done, "num_batches": self.num_batches, "rng": rng}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = int(state_dict["epoch"])
        self.batches_done = int(state_dict["batches_done"])
        self.num_batches = int(state_dict["num_batches"])
        rng = dict(state_dict["rng"])
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        rng["numpy"] = (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss))
        version, internal, gauss_next = rng["python"]
        rng["python"] = (version, tuple(internal), gauss_next)
        self._pending_rng = rng

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # the CSV logger buffers its rows (100 steps): on disk with the checkpoint, a resume after a SIGKILL
        # continues them (busiseg.loggers.ResumableCSVLogger) instead of starting the learning curve at the kill
        for logger in trainer.loggers:
            logger.save()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if state is None or trainer.state.fn != TrainerFn.FITTING:
            return  # test/validate/predict from a checkpoint ("best") is not a resume: nothing to reposition
        self.load_state_dict(state)
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "resume_at"):
            return
        mid_epoch = not (self.num_batches and self.batches_done >= self.num_batches)
        if not mid_epoch:
            datamodule.resume_at(self.epoch + 1, 0)  # saved at the end of an epoch: the next starts afresh
        else:
            datamodule.resume_at(self.epoch, self.batches_done)
        exact = bool(getattr(datamodule, "exact_resume", False))
        if exact:
            # Lightning warns on every mid-epoch resume that a loader without state_dict "can cause unreliable
            # results"; here the seeded sampler skips the batches done and the RNG is restored, so the rest
            # of the epoch is the interrupted run's (tests/test_reliability.py). Where it is not, the warning stays.
            warnings.filterwarnings("ignore", message=_LIGHTNING_NOT_RESUMABLE, category=PossibleUserWarning)
        log.info("resuming at epoch %d, after %d batch(es) of it%s", self.epoch, self.batches_done,
                 " (the sampler skips them: exact)" if exact and mid_epoch else "")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending_rng is not None:  # the first batch after a resume: the RNG as it was at the save
            _set_rng_states(self._pending_rng)
            self._pending_rng = None


class GracefulInterrupt(L.Callback):
    """On SIGTERM or SIGINT: finish the batch, save ``last.ckpt``, stop with ``TrainingInterrupted``.

    Lightning's signal connector turns SIGTERM into ``SIGTERMException`` at the next batch
    boundary; this callback routes SIGINT to the same flag and saves the checkpoint there.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self.signum: int | None = None
        self._previous: Any = None
        self.saved: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            self.signum = signum
            log.warning("Ctrl-C: stopping after this batch and saving %s (press again to stop at once)", self.path)
            trainer._signal_connector.received_sigterm = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        signal.signal(signal.SIGINT, on_sigint)  # SIGTERM: Lightning's own handler sets the same flag

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, SIGTERMException):
            self.signum = self.signum or signal.SIGTERM
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved = self.path  # fit_or_raise_interrupted's message names it, with the command that resumes


def fit_or_raise_interrupted(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
                             ckpt_path: str | None, output_dir: Path, entry: str) -> None:
    """``trainer.fit``; a SIGTERM/SIGINT becomes :class:`TrainingInterrupted` naming the checkpoint saved
    and the command that continues the run (``python -m <entry> resume=<output_dir>``)."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException as exc:
        guard = next(c for c in trainer.callbacks if isinstance(c, GracefulInterrupt))
        signum = guard.signum or 15
        raise TrainingInterrupted(
            f"interrupted by signal {signum} at step {trainer.global_step}: saved {guard.saved}; continue with "
            f"python -m {entry} resume={output_dir}", signum) from exc


def check_loss(module: L.LightningModule, loss: torch.Tensor, batch: dict[str, torch.Tensor], action: str) -> bool:
    """True if the loss is finite; else stop (raise NonFiniteLossError) or skip (warn, return False)."""
    if bool(torch.isfinite(loss.detach()).all()):
        return True
    trainer = module.trainer
    names: list[str] = []
    records = getattr(getattr(trainer, "datamodule", None), "records", None)
    if records and "index" in batch:
        names = [records[int(i)].name for i in batch["index"].flatten().tolist()]
    where = f"global step {trainer.global_step} (epoch {trainer.current_epoch})"
    files = ", ".join(names) if names else "unknown"
    if action == "skip":
        log.warning("non-finite loss (%s) at %s: batch skipped; its files: %s", float(loss.detach()), where, files)
        return False
    raise NonFiniteLossError(
        f"non-finite loss ({float(loss.detach())}) at {where}; the batch's files: {files}. The last good checkpoint "
        f"is kept (checkpoints/last.ckpt). Lower optimizer.lr, check those files, or set guard.nonfinite=skip "
        f"to skip such batches"
    )

"""Load a trained network from a busiseg checkpoint, safely (no pickled objects run)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, Sequence

import hydra
import lightning as L
import torch

from busiseg.models.net import MultiTaskUnet

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def training_run_dir(ckpt_path: Path) -> Path:
    """``<run>/checkpoints/x.ckpt -> <run>``; a checkpoint elsewhere: its own folder."""
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only."""
    path = Path(path)
    if path.is_dir():  # a run folder given for its checkpoint
        found = sorted(path.glob("*.ckpt")) + sorted(path.glob("checkpoints/*.ckpt"))
        held = (f"in it: {', '.join(str(p) for p in found[:4])}{', ...' if len(found) > 4 else ''}" if found
                else "none in it or in its checkpoints/ folder")
        raise CheckpointError(f"{path}: a folder, not a checkpoint: pass a .ckpt file ({held})")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if detail.startswith("Unsupported global"):  # the weights-only unpickler met a class or function to call
            raise CheckpointError(
                f"{path}: refused: the checkpoint holds pickled Python objects, which could run code when "
                f"loaded; only weights and plain values are accepted ({detail})"
            ) from exc
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (damaged, or another kind of file: "
                              f"{detail})") from exc
    except Exception as exc:  # noqa: BLE001 - a text file, a truncated zip...: the same one-line error
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (damaged, or another kind of file: "
                              f"{exc.__class__.__name__}: {exc})") from exc


def _unpickler_detail(exc: Exception) -> str:
    """The weights-only unpickler's own reason ('Unsupported global: GLOBAL print was not an allowed global by
    default', 'Unsupported operand 45'), without torch's advice around it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return reason.split(". Please")[0].rstrip(".")
    return lines[0] if lines else exc.__class__.__name__


def _stage_hint(state: Any) -> str:
    """Where a second-stage file given as a network checkpoint belongs."""
    from busiseg.models.crop_classifier import FORMAT as CROP_FORMAT
    from busiseg.models.mask_refiner import FORMAT as REFINER_FORMAT

    fmt = str(state.get("format", "")) if isinstance(state, dict) else ""
    if fmt == REFINER_FORMAT:
        key = "mask_refiner"
    elif fmt == CROP_FORMAT:
        key = "scan_classifier" if "normal" in (state.get("classes") or ()) else "crop_classifier"
    else:
        return ""
    return f" (a {key.replace('_', ' ')} file: pass it as {key}=, and the run's checkpoints/last.ckpt as ckpt_path=)"


def load_model(path: str | Path) -> tuple[MultiTaskUnet, dict[str, Any]]:
    """Rebuild the network from the config stored in the checkpoint and load its weights.

    Returns ``(net in eval mode on CPU, the training run's resolved config)``.
    """
    ckpt = read_checkpoint(path)
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if not config or "model" not in config:
        raise CheckpointError(f"{path}: no busiseg config in the checkpoint's hyper_parameters{_stage_hint(ckpt)}")
    model_cfg = {**config["model"], "encoder_weights": None}  # the weights come from the checkpoint
    net = hydra.utils.instantiate(model_cfg)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model in its config ({exc})") from exc
    return net.eval(), config


# where a busiseg checkpoint (pretrain or train) lists the images its weights were trained on: names
# relative to the data root, e.g. "benign/benign (3).png"
TRAINED_ON_KEY = "busiseg.trained_on"


def trained_on(trainer: L.Trainer) -> list[str]:
    """The names of the images in the training part of the trainer's datamodule ([] if none is known)."""
    datamodule = getattr(trainer, "datamodule", None)
    dataset = getattr(datamodule, "train_dataset", None)
    if dataset is None or not hasattr(datamodule, "records"):
        return []
    return sorted(datamodule.records[i].name for i in dataset.indices)


class PretrainingOverlap(L.Callback):
    """Refuses a fit whose validation or test images were among the images its ``init_weights`` were
    trained on (``busiseg.pretrain`` and ``busiseg.train`` checkpoints store their names): even
    self-supervised, the network would have seen the pixels it is scored on, and a cross-validation
    would no longer be leak-free."""

    def __init__(self, path: str, pretrained_on: Sequence[str]):
        self.path = path
        self.pretrained_on = set(pretrained_on)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        for part in ("val", "test"):
            dataset = getattr(datamodule, f"{part}_dataset", None)
            if dataset is None:
                continue
            names = [datamodule.records[i].name for i in dataset.indices]
            seen = sorted(n for n in names if n in self.pretrained_on)
            if seen:
                raise CheckpointError(
                    f"init_weights={self.path} was trained on {len(seen)} of this run's {len(names)} {part} "
                    f"images (e.g. {seen[0]}): pretrain on this run's split (the same split and split.fold, or "
                    f"split.file=<pretrain run>/split.json) so that its {part} images stay unseen")
        if trainer.is_global_zero:
            log.info("init_weights=%s: network weights loaded; none of this run's validation or test images is "
                     "among the %d images they were trained on", self.path, len(self.pretrained_on))


def _model_differences(stored: dict[str, Any], current: dict[str, Any]) -> str:
    """``model.KEY=checkpoint's (this run: VALUE)`` for each model key whose value differs."""
    keys = sorted(k for k in set(stored) | set(current)
                  if k not in ("_target_", "encoder_weights") and stored.get(k) != current.get(k))
    return ", ".join(f"model.{k}={stored.get(k)!r} (this run: {current.get(k)!r})" for k in keys)


def load_init_weights(net: torch.nn.Module, path: str | Path,
                      model_cfg: dict[str, Any] | None = None) -> PretrainingOverlap:
    """Load a busiseg checkpoint's network weights (``busiseg.pretrain`` or ``busiseg.train``) into
    ``net`` for a new fit (``init_weights=PATH``); the network must be built with the same ``model.*``
    settings. Returns the callback that checks, once the split is known, that none of the fit's
    validation or test images were pretrained on."""
    ckpt = read_checkpoint(path)
    state = {k.removeprefix("net."): v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith("net.")}
    if not state:
        raise CheckpointError(f"init_weights={path}: no network weights in the checkpoint (state_dict 'net.*')")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        stored = ((ckpt.get("hyper_parameters") or {}).get("config") or {}).get("model")
        differences = _model_differences(stored, model_cfg) if stored and model_cfg else ""
        detail = differences or " ".join(line.strip() for line in str(exc).strip().splitlines()[:3])[:300]
        raise CheckpointError(
            f"init_weights={path}: the weights do not fit this run's network; build it with the model.* "
            f"settings the checkpoint was trained with: {detail}"
        ) from exc
    return PretrainingOverlap(str(path), ckpt.get(TRAINED_ON_KEY) or [])


class MemberInputError(CheckpointError):
    """An ensemble member trained at another input size or channel count than the first."""


def load_ensemble(first: torch.nn.Module, ckpt_paths: Sequence[str | Path], image_size: int,
                  in_channels: int) -> torch.nn.Module:
    """The first checkpoint's network (already loaded) and the other checkpoints' networks as one
    :class:`busiseg.inference.Ensemble`; every member must take the first one's input
    (``data.image_size``, ``data.in_channels``), else :class:`MemberInputError` naming the file."""
    from busiseg.inference import Ensemble

    nets = [first]
    for path in ckpt_paths[1:]:
        net, config = load_model(path)
        data = dict(config.get("data") or {})
        size, channels = data.get("image_size"), data.get("in_channels", 1)
        if size is None or int(size) != image_size or int(channels) != in_channels:
            raise MemberInputError(
                f"{path}: trained at data.image_size={size}, data.in_channels={channels}; the ensemble's first "
                f"checkpoint {ckpt_paths[0]} at {image_size}, {in_channels}: members must take the same input"
            )
        nets.append(net)
    return Ensemble(nets)

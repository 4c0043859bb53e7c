"""Load a trained network from a busiseg checkpoint, safely (no pickled objects run)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Sequence

import hydra
import torch

from busiseg.models.net import MultiTaskUnet


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: the checkpoint holds pickled Python objects, which could run code when "
            f"loaded; only weights and plain values are accepted ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc.__class__.__name__}: {exc})") from exc


def load_model(path: str | Path) -> tuple[MultiTaskUnet, dict[str, Any]]:
    """Rebuild the network from the config stored in the checkpoint and load its weights.

    Returns ``(net in eval mode on CPU, the training run's resolved config)``.
    """
    ckpt = read_checkpoint(path)
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if not config or "model" not in config:
        raise CheckpointError(f"{path}: no busiseg config in the checkpoint's hyper_parameters")
    model_cfg = {**config["model"], "encoder_weights": None}  # the weights come from the checkpoint
    net = hydra.utils.instantiate(model_cfg)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model in its config ({exc})") from exc
    return net.eval(), config


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

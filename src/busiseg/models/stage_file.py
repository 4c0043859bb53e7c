"""What the second-stage networks (the crop classifier, the mask refiner) share: their input batches and
autocast, the checks of their crop-training settings, and their file.

The file is one ``torch.save`` dictionary with a ``format`` tag, written atomically and read with
``weights_only=True`` (no pickled objects run); every error is one line naming the file.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from busiseg.atomic import write_bytes_atomic


def crop_batch(crops: Sequence[np.ndarray]) -> torch.Tensor:
    """Crops in [0, 1] (float32) -> a normalised (N, 1, S, S) batch."""
    batch = np.stack([np.ascontiguousarray(c, dtype=np.float32) for c in crops])
    return (torch.from_numpy(batch)[:, None] - 0.5) / 0.25


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` with ``dtype``, or nothing where ``dtype`` is None (full precision)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def crop_training_problems(s: Any) -> list[str]:
    """What is out of range among the crop-training settings both stages have (``epochs``, ``batch_size``,
    ``train_margin``, ``test_margins``, ``jitter``, ``lr``, ``weight_decay``), one phrase each naming the key."""
    problems = []
    if s.epochs < 1 or s.batch_size < 1:
        problems.append(f"epochs={s.epochs}, batch_size={s.batch_size} (at least 1)")
    if len(s.train_margin) != 2 or not 0 < s.train_margin[0] <= s.train_margin[1]:
        problems.append(f"train_margin={list(s.train_margin)} (two values, 0 < lo <= hi)")
    if not s.test_margins or min(s.test_margins) <= 0:
        problems.append(f"test_margins={list(s.test_margins)} (one or more positive values)")
    if not 0 <= s.jitter < 0.5:
        problems.append(f"jitter={s.jitter} (0 <= jitter < 0.5)")
    if s.lr <= 0 or s.weight_decay < 0:
        problems.append(f"lr={s.lr}, weight_decay={s.weight_decay}")
    return problems


def save_stage_file(path: str | Path, fmt: str, net: torch.nn.Module, settings: Any, trained_on: Sequence[str],
                    **extra: Any) -> Path:
    """Write ``net``'s weights, its ``settings`` (a dataclass), the names of the images it was trained on and
    ``extra`` (plain values) under the format tag ``fmt`` to ``path``, atomically."""
    state = {"format": fmt, "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
             "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
             "trained_on": list(trained_on), **extra}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def read_stage_file(path: str | Path, fmt: str, error: type[Exception], noun: str, how_to_make: str) -> dict[str, Any]:
    """The stored dictionary of a ``noun`` file of format ``fmt``; ``error`` (one line naming the file) when it is
    missing (with ``how_to_make``), unreadable, or another kind of file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {noun} not found ({how_to_make})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise error(f"{path}: not a readable {noun.replace(' ', '-')} file ({exc.__class__.__name__})") from exc
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise error(f"{path}: not a busiseg {noun} (expected format {fmt!r}; a network checkpoint goes to ckpt_path=)")
    return state


def refuse_trained_on(trained_on: Sequence[str], names: Sequence[str], source: str | Path, error: type[Exception],
                      noun: str, how_to_train: str) -> None:
    """``error`` when any of ``names`` (images about to be scored) is among those the ``noun`` was trained on."""
    seen = sorted(set(names) & set(trained_on))
    if seen:
        raise error(f"{source}: the {noun} was trained on {len(seen)} of the {len(names)} images evaluated "
                    f"(e.g. {seen[0]}); {how_to_train}. Images are matched by class folder and file name: another "
                    "dataset's images that reuse those names must be renamed to be scored")

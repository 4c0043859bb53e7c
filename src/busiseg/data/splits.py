"""Splits (config group ``split``): which records train, validate and test.

A split is a dict ``{"train": [...], "val": [...], "test": [...]}`` of record names
(``class/file.png``), saved as JSON in the run dir so that later runs and eval can use
exactly the same images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from busiseg.data.busi import Record

PARTS = ("train", "val", "test")


class HoldoutSplitter:
    """Stratified by class, deterministic for a seed: each class is shuffled and cut into
    train/val/test by the fractions (val and test rounded, train takes the rest)."""

    def __init__(self, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 42):
        for key, value in (("split.val_fraction", val_fraction), ("split.test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"split.val_fraction + split.test_fraction must be < 1 (leaving images to train on), "
                f"got {val_fraction} + {test_fraction}"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed

    def split(self, records: list[Record]) -> dict[str, list[str]]:
        rng = np.random.default_rng(self.seed)
        parts: dict[str, list[str]] = {p: [] for p in PARTS}
        for label in sorted({r.label for r in records}):
            names = [r.name for r in records if r.label == label]
            order = rng.permutation(len(names))
            n_val = int(round(self.val_fraction * len(names)))
            n_test = int(round(self.test_fraction * len(names)))
            shuffled = [names[i] for i in order]
            parts["val"] += shuffled[:n_val]
            parts["test"] += shuffled[n_val : n_val + n_test]
            parts["train"] += shuffled[n_val + n_test :]
        return {p: sorted(v) for p, v in parts.items()}


def save_split(split: dict[str, list[str]], path: str | Path) -> Path:
    """Write the split as JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(split, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_split(path: str | Path) -> dict[str, list[str]]:
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the split file ({exc})") from exc
    if not isinstance(split, dict) or not all(isinstance(split.get(p), list) for p in PARTS):
        raise ValueError(f"{path}: a split file must hold lists 'train', 'val' and 'test'")
    return split

"""Evaluated images that are copies of training images (``busiseg.eval``'s ``copies_check``).

BUSI holds many copies of one scan (re-crops, rescales, with and without calipers; docs/data.md). The splits keep a
copy group on one side, but a folder of held-back images scored with ``part=all`` may hold copies of images the
model trained on, and its score on them flatters the model. This runs the audit's near-duplicate detector
(``busiseg.data.duplicates``, the ``duplicates`` settings) on the evaluated images together with the images the
checkpoint(s) trained on, and names every evaluated image that lands in one group with a training image.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from busiseg.data.busi import DatasetError, Record, _open, format_problems, image_to_array, scan_busi
from busiseg.data.duplicates import DuplicateParams, find_duplicates, fingerprint
from busiseg.data.splits import load_split

log = logging.getLogger("busiseg.evaluation.copies")


def trained_on(ckpt_path: Path) -> list[str]:
    """The images a checkpoint was trained on: its run's ``split.json`` train part, or, for a checkpoint away from
    its run (no ``split.json`` beside it or one level up), the names the checkpoint itself stores."""
    from busiseg.checkpoint import TRAINED_ON_KEY, read_checkpoint, training_run_dir

    split = training_run_dir(Path(ckpt_path)) / "split.json"
    if split.is_file():
        return list(load_split(split)["train"])
    names = read_checkpoint(ckpt_path).get(TRAINED_ON_KEY)
    if not names:
        raise ValueError(f"{ckpt_path}: no {split} beside it and no list of training images in it")
    log.info("%s: no %s beside it; the %d training images it stores are compared", ckpt_path, split, len(names))
    return list(names)


def training_records(ckpt_paths: Sequence[Path], root: Path) -> list[Record]:
    """The images every checkpoint of ``ckpt_paths`` trained on (:func:`trained_on`), read from ``root``, the
    runs' data root; each image once."""
    names: set[str] = set()
    for ckpt in ckpt_paths:
        names.update(trained_on(ckpt))
    return [r for r in scan_busi(root) if r.name in names]


def copies_of_training(evaluated: Sequence[Record], trained: Sequence[Record], params: DuplicateParams,
                       progress: Callable[[Iterable, int], Iterable] | None = None,
                       workers: int | None = None) -> list[dict[str, Any]]:
    """``[{"image": evaluated name, "training_images": [names]}]`` for every evaluated image that the detector
    groups (directly or through other copies) with at least one of ``trained``, in the evaluated order."""
    records = [*evaluated, *trained]
    workers = workers or min(4, os.cpu_count() or 1)

    def read(record: Record):
        try:
            with _open(record.image) as image:
                return fingerprint(image_to_array(image, 3), params)  # 16-bit/float stretched, as the audit reads it
        except DatasetError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        prints = list(pool.map(read, records))
    problems = [p for p in prints if isinstance(p, str)]
    if problems:  # every unreadable file in one error
        raise DatasetError(format_problems(f"{len(problems)} file(s) cannot be used", problems))
    found = find_duplicates(prints, params, workers=workers, progress=progress)
    n = len(evaluated)
    copies: dict[int, list[str]] = {}
    for group in found.groups:
        ours = [k for k in group if k < n]
        theirs = sorted(records[k].name for k in group if k >= n)
        if theirs:
            copies.update((k, theirs) for k in ours)
    return [{"image": evaluated[k].name, "training_images": copies[k]} for k in sorted(copies)]


def check_copies(evaluated: Sequence[Record], ckpt_paths: Sequence[Path], train_root: Path | None,
                 params: DuplicateParams, progress: Callable[[Iterable, int], Iterable] | None = None,
                 exclude: bool = False) -> dict[str, Any]:
    """What metrics.json records under ``copies_of_training``: ``checked`` (false, with ``why``, where the training
    images cannot be read), the number of ``training_images`` compared, the evaluated ``images`` that are copies
    of them and the seconds it took. Logs a warning naming them."""
    if train_root is None or not Path(train_root).is_dir():
        why = f"the training images ({train_root}) are not on this machine"
        log.warning("copies of training images not checked: %s", why)
        return {"checked": False, "why": why}
    started = time.perf_counter()
    try:
        trained = training_records(ckpt_paths, Path(train_root))
    except (ValueError, OSError) as exc:  # a bad split.json, checkpoint or dataset (DatasetError, CheckpointError)
        log.warning("copies of training images not checked: %s", exc)
        return {"checked": False, "why": str(exc)}
    log.info("looking for copies of the %d training images among the %d evaluated ones (copies_check=off turns "
             "this off)", len(trained), len(evaluated))
    found = copies_of_training(evaluated, trained, params, progress)
    if found:
        first = found[0]
        log.warning("%d of the %d evaluated images %s of images the model trained on (e.g. %s ~ %s): "
                    "scores on them flatter it; metrics.json copies_of_training lists them (%s)", len(found),
                    len(evaluated), "is a copy" if len(found) == 1 else "are copies", first["image"],
                    first["training_images"][0], "copies_check=exclude leaves them out of the scores" if exclude
                    else "leave them out of the scores with copies_check=exclude")
    else:
        log.info("no evaluated image is a copy of a training image")
    return {"checked": True, "training_images": len(trained), "images": found,
            "seconds": round(time.perf_counter() - started, 1)}

"""Read a folder in the BUSI (Kaggle) layout into records, and decode one record.

Layout: ``ROOT/{benign,malignant,normal}/NAME (N).png`` beside its masks
``NAME (N)_mask.png``, ``NAME (N)_mask_1.png``, ... Scanning reads no pixels
(unless the layout is already at fault: then it reads every file, so that one
error names the unreadable ones too); ``load_record`` decodes one image and
merges its masks; the dataset cache (data/dataset.py) decodes every record once
before training and reports every bad file in one error.

Quirks of real downloads handled here (see docs/data.md):
- several masks per image: merged by union;
- masks saved as 1-bit, L, RGB or RGBA PNGs; in RGBA masks the alpha channel is
  opaque everywhere, so only the colour channels say where the lesion is;
- images saved as RGB, some with colour overlays (Doppler, calipers): converted
  to grey with ITU-R 601 luma unless 3 channels are asked for;
- image numbers with gaps; stray files (thumbnails, .DS_Store, desktop.ini).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from busiseg.data.labels import CLASS_NAMES, LABEL_OF

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<k>\d+))?$", re.IGNORECASE)


class DatasetError(ValueError):
    """Bad input in a dataset folder; the message names every file at fault."""


@dataclass(frozen=True)
class Record:
    """One image of the dataset: where its pixels are and what it is. No pixels."""

    image: Path
    masks: tuple[Path, ...]
    label: int

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]

    @property
    def name(self) -> str:
        """Path relative to the dataset root, e.g. ``benign/benign (3).png``."""
        return f"{self.image.parent.name}/{self.image.name}"


def _image_number(path: Path) -> tuple[int, str]:
    """Sort key: the number in ``NAME (N)`` numerically, then the name."""
    m = re.search(r"\((\d+)\)", path.stem)
    return (int(m.group(1)) if m else -1, path.name)


def root_from_env(var: str = "BUSI_ROOT") -> str:
    """The dataset folder named by the environment variable ``var`` (the scripts' and tests' convention).

    Unset or empty: a one-line error naming the variable on stderr and exit status 2, no traceback.
    """
    root = os.environ.get(var)
    if not root:
        print(f"error: set {var} to the Dataset_BUSI_with_GT folder", file=sys.stderr)
        raise SystemExit(2)
    return root


def scan_busi(root: str | Path, classes: tuple[str, ...] = CLASS_NAMES, empty_class_ok: bool = True) -> list[Record]:
    """List the dataset's images with their masks and labels, sorted by class then number.

    Raises DatasetError naming the folder or files at fault: a missing root or class
    folder, an empty dataset, images without masks, masks without images. When there are
    such problems every file is read as well, so that the same error also names the
    unreadable files and the masks of another size (a healthy dataset is not read here).

    A class folder without images (while others have some) is named in a warning, or with
    ``empty_class_ok=False`` (training: one output per class) listed as a problem.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"dataset root {root} does not exist or is not a folder "
            "(set data.root to a folder holding benign/, malignant/ and normal/)"
        )
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        # the Kaggle download unpacks into a folder of its own (Dataset_BUSI_with_GT/): point at it
        inside = sorted(d for d in root.iterdir() if d.is_dir() and all((d / c).is_dir() for c in classes))
        hint = f"; {inside[0].name}/ inside it has them: data.root={inside[0]}" if len(inside) == 1 else ""
        raise DatasetError(
            f"dataset root {root} lacks the class folder(s) {', '.join(f'{c}/' for c in missing)} "
            f"(expected one folder per class: {', '.join(classes)}){hint}"
        )

    records: list[Record] = []
    problems: list[str] = []
    ignored: list[Path] = []
    empty: list[str] = []
    for class_name in classes:
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = {}
        for path in sorted((root / class_name).iterdir()):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                ignored.append(path)
                continue
            m = _MASK_RE.match(path.stem)
            if m:
                masks.setdefault(m.group("stem"), []).append((int(m.group("k") or 0), path))
            else:
                images[path.stem] = path
        if not images and not masks:
            empty.append(class_name)
        for stem in sorted(set(masks) - set(images)):
            for _, p in masks[stem]:
                problems.append(f"{p}: mask without an image (expected {stem}.png beside it)")
        for stem, image in sorted(images.items(), key=lambda kv: _image_number(kv[1])):
            if stem not in masks:
                problems.append(f"{image}: image without a mask (expected {stem}_mask.png beside it)")
                continue
            mask_paths = tuple(p for _, p in sorted(masks[stem]))
            records.append(Record(image=image, masks=mask_paths, label=LABEL_OF[class_name]))

    if ignored:
        warnings.warn(
            f"{root}: ignored {len(ignored)} file(s) that are neither images nor masks "
            f"(e.g. {ignored[0].name})",
            stacklevel=2,
        )
    if empty and len(empty) < len(classes):
        if empty_class_ok:
            warnings.warn(
                f"{root}: the class folder(s) {', '.join(c + '/' for c in empty)} hold no images "
                "(scores of that class have no support; training refuses such a dataset)",
                stacklevel=2,
            )
        else:
            problems += [f"{root / c}/: the class folder holds no images (training needs images of every class: "
                         f"{', '.join(classes)})" for c in empty]
    if problems:
        # the layout stops the run anyway: read every file now, so that this one error lists them all
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
            problems += [p for found in pool.map(file_problems, records) for p in found]
        raise DatasetError(format_problems(f"{root}: {len(problems)} problem(s) in the dataset", problems))
    if not records:
        raise DatasetError(f"dataset root {root} holds no images in {', '.join(c + '/' for c in classes)}")
    return records


def format_problems(head: str, lines: list[str], limit: int = 50) -> str:
    shown = "\n".join(f"  - {line}" for line in lines[:limit])
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{head}:\n{shown}{more}"


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image, naming the file in any error."""
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read the image ({exc.__class__.__name__}: {exc})") from exc


def mask_size_problem(path: Path, mask_size: tuple[int, int], size: tuple[int, int]) -> str:
    """The one wording of a mask whose size is not its image's (scan, decode and audit say it alike)."""
    return f"{path}: mask size {mask_size[0]}x{mask_size[1]} differs from its image's {size[0]}x{size[1]}"


def file_problems(record: Record) -> list[str]:
    """Every file of one record that cannot be read, and every mask of another size than its image."""
    problems: list[str] = []
    size = None
    try:
        size = _open(record.image).size
    except DatasetError as exc:
        problems.append(str(exc))
    for path in record.masks:
        try:
            mask_size = _open(path).size
        except DatasetError as exc:
            problems.append(str(exc))
            continue
        if size is not None and mask_size != size:
            problems.append(mask_size_problem(path, mask_size, size))
    return problems


def mask_to_bool(im: Image.Image) -> np.ndarray:
    """Lesion pixels of one mask file: any non-zero colour value.

    The alpha channel is ignored: BUSI's RGBA masks are opaque everywhere, so
    counting alpha would mark the whole image as lesion.
    """
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        arr = np.asarray(im)[..., :3]
    elif im.mode in ("1", "L", "I", "I;16", "F"):
        arr = np.asarray(im)
    else:
        arr = np.asarray(im.convert("RGB"))
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    return arr > 0


def merge_masks(mask_images: list[Image.Image], paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    """Union of an image's masks; every mask must have the image's size (width, height)."""
    merged = np.zeros((size[1], size[0]), dtype=bool)
    for im, path in zip(mask_images, paths):
        if im.size != size:
            raise DatasetError(mask_size_problem(path, im.size, size))
        merged |= mask_to_bool(im)
    return merged


def image_to_array(im: Image.Image, in_channels: int = 1) -> np.ndarray:
    """uint8 HxW (grey) or HxWx3 array; 16-bit, 32-bit and float images are stretched to 0..255."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo = min(float(arr.min()), 0.0)  # unsigned data keeps 0 as black; negative values are shifted up
        span = float(arr.max()) - lo
        arr = (arr - lo) / (span if span > 0 else 1.0)
        im = Image.fromarray((arr * 255.0).round().astype(np.uint8), mode="L")
    if in_channels == 1:
        return np.asarray(im.convert("L"))
    if in_channels == 3:
        return np.asarray(im.convert("RGB"))
    raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")


def load_record(record: Record, in_channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Decode one record at its original size: (image uint8 HxW[x3], merged bool mask HxW)."""
    image = _open(record.image)
    masks = [_open(p) for p in record.masks]
    mask = merge_masks(masks, list(record.masks), image.size)
    return image_to_array(image, in_channels), mask


def summarize(records: list[Record]) -> dict[str, int]:
    """Image count per class name (all classes present, zero where none)."""
    counts = Counter(r.class_name for r in records)
    return {name: counts.get(name, 0) for name in CLASS_NAMES}

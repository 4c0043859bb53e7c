"""Predict lesion masks and classes with an exported ONNX model, without PyTorch.

``python -m busiseg.onnx_predictor model.onnx INPUT OUTPUT`` needs only onnxruntime,
numpy and Pillow (rich, when installed, adds a progress bar). The model's JSON sidecar
(``model.onnx.json``, written by ``busiseg.export``) supplies the image size, channels,
class names and threshold, so nothing else is needed.

This module also holds the file handling that ``busiseg.predict`` shares, so both tools
find the same inputs and write the same files: finding images (recursively, masks of a
BUSI folder skipped), output paths that cannot leave the output folder, the mask PNG at
the original size, the overlay PNG and ``predictions.csv``, each written atomically.
It must never import torch (tests/test_onnx_predictor.py checks this in a subprocess).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from busiseg.atomic import output_folder_problem, write_bytes_atomic  # noqa: F401  (also used by predict and export)
from busiseg.data.busi import IMAGE_SUFFIXES, image_to_array
from busiseg.models.reporting import overlay_mask, save_png

log = logging.getLogger("busiseg.predict")
# images with a side below this (px) are predicted with a warning: BUSI's scans are some 500 px across
TINY_SIDE = 32

MASK_SUFFIX = "_pred_mask.png"
OVERLAY_SUFFIX = "_overlay.png"
CSV_NAME = "predictions.csv"
# BUSI ground-truth masks: NAME_mask.png, NAME_mask_1.png, ...
MASK_NAME = re.compile(r"^(?P<stem>.+)_mask(?:_\d+)?$", re.IGNORECASE)
SIDECAR_SUFFIX = ".json"
# images larger than this (width x height) are refused from their header, before any decoding
DEFAULT_MAX_PIXELS = 100_000_000


class InputError(ValueError):
    """An input or output location that cannot be used; the message names it."""


class UnsafeOutputPath(InputError):
    """An output path that would land outside the output folder."""


# --------------------------------------------------------------------------- finding inputs
@dataclass(frozen=True)
class InputImage:
    """One image to predict: where it is, and its name relative to the input (the output mirrors it)."""

    path: Path
    name: PurePosixPath


def _natural_key(name: PurePosixPath) -> list[Any]:
    """``benign (2)`` before ``benign (10)``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name.as_posix())]


def _earlier_predictions(folder: Path, filenames: Sequence[str]) -> bool:
    """Is ``folder`` an output folder of predict (its ``predictions.csv``, with predict's header)?"""
    if "predictions.csv" not in filenames:
        return False
    try:
        with open(folder / "predictions.csv", encoding="utf-8", errors="replace") as f:
            header = f.readline().strip()
    except OSError:
        return False
    # "class" is the column's name in folders written before it became "pred_class"
    return header.startswith(("file,pred_class,prob_", "file,class,prob_")) and header.endswith(",mask,overlay")


def find_images(input_path: str | Path, skip_masks: bool | str = "auto",
                exclude: Sequence[str | Path] = ()) -> tuple[list[InputImage], list[Path]]:
    """Images under ``input_path`` (a file, or a folder walked recursively) and the mask files skipped.

    Hidden files and folders are ignored, and so are folders in ``exclude`` (the output
    folder when it lies inside the input) and earlier prediction folders below the input (a
    ``predictions.csv`` with predict's header: predict's own output, logged).
    ``skip_masks``: ``"auto"`` skips a file named
    like a BUSI mask (``X_mask.png``, ``X_mask_N.png``) when an image ``X.*`` sits beside
    it; ``True`` skips every such name; ``False`` skips none. A file given by name is
    always taken, whatever its suffix.
    """
    if skip_masks not in (True, False, "auto"):
        raise InputError(f"skip_masks must be true, false or auto, got {skip_masks!r}")
    root = Path(input_path).expanduser()
    if root.is_file():
        return [InputImage(root, PurePosixPath(root.name))], []
    if not root.is_dir():
        raise InputError(f"input {root} does not exist (pass input=FILE_OR_FOLDER)")
    excluded = {Path(p).expanduser().resolve() for p in exclude}
    found: list[InputImage] = []
    skipped: list[Path] = []
    others: list[Path] = []  # files that are not images by their suffix: counted, not read
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are not followed: no loops
        here = Path(dirpath)
        if here != root and _earlier_predictions(here, filenames):
            log.warning("%s: skipped, an earlier prediction folder (its predictions.csv is predict's)", here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded)
        names = sorted(f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
        taken = set(names)
        others += [here / f for f in sorted(filenames) if not f.startswith(".") and f not in taken]
        stems = {Path(f).stem for f in names}
        for f in names:
            m = MASK_NAME.match(Path(f).stem)
            if m and (skip_masks is True or (skip_masks == "auto" and m.group("stem") in stems)):
                skipped.append(here / f)
                continue
            found.append(InputImage(here / f, PurePosixPath((here / f).relative_to(root).as_posix())))
    if others:
        log.warning("%d file(s) under %s are not images (%s) and were ignored, e.g. %s", len(others), root,
                    " ".join(IMAGE_SUFFIXES), others[0].relative_to(root))
    found.sort(key=lambda im: _natural_key(im.name))
    return found, skipped


def read_image(path: Path, in_channels: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode any PNG/JPEG/BMP/TIFF (grey, RGB, RGBA, palette, 16-bit) to uint8 HxW or HxWx3.

    The same conversion as training (``busiseg.data.busi.image_to_array``); errors name the file.
    An image over ``max_pixels`` is refused from its header (Pillow reads the size without
    decoding), so a huge or forged file cannot exhaust memory; Pillow's own decompression-bomb
    limit, when lower, is reported the same way.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise InputError(f"{path}: refused: {w}x{h} = {w * h:,} pixels is over max_pixels={max_pixels:,} "
                                 f"(raise max_pixels to predict it)")
            im.load()
            return image_to_array(im, in_channels)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: cannot read the image ({exc.__class__.__name__}: {exc})") from exc


# --------------------------------------------------------------------------- safe output paths
def output_base(name: PurePosixPath, use_full_name: bool = False) -> PurePosixPath:
    """Where an input's outputs go, relative to the output folder, without the suffix.

    ``benign/benign (3).png`` -> ``benign/benign (3)`` (+ ``_pred_mask.png`` / ``_overlay.png``);
    with ``use_full_name`` (two inputs share a stem, e.g. ``a.png`` and ``a.jpg``) -> ``benign/a.png``.
    Absolute names and ``..``/``.`` parts are refused.
    """
    parts = name.parts
    if not parts or name.is_absolute() or any(p in ("", ".", "..") or "/" in p or "\x00" in p for p in parts):
        raise UnsafeOutputPath(f"{name}: refused as an output name (absolute, empty or with '..' parts)")
    last = parts[-1] if use_full_name else PurePosixPath(parts[-1]).stem
    if last in ("", ".", ".."):
        raise UnsafeOutputPath(f"{name}: refused as an output name")
    return PurePosixPath(*parts[:-1], last)


def safe_output_path(output_root: Path, relative: PurePosixPath) -> Path:
    """``output_root / relative``, refused if it (after following any symlinks already there) leaves the root."""
    root = output_root.resolve()
    if relative.is_absolute() or ".." in relative.parts:
        raise UnsafeOutputPath(f"{relative}: refused as an output name (absolute or with '..' parts)")
    candidate = root.joinpath(*relative.parts)
    if not candidate.resolve().is_relative_to(root):
        raise UnsafeOutputPath(f"{relative}: the output path {candidate} resolves outside the output folder {root}")
    return candidate


# --------------------------------------------------------------------------- pixels
def resize_bilinear(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (height, width), pixel centres aligned.

    The same sampling as OpenCV's ``INTER_LINEAR`` (``busiseg.inference.restore_size``),
    so the ONNX predictor restores sizes like predict does, without OpenCV.
    """
    prob = np.asarray(prob, dtype=np.float32)
    height, width = size
    if prob.shape == (height, width):
        return prob

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0.0, n_in - 1)
        i0 = np.floor(x).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (x - i0).astype(np.float32)

    y0, y1, wy = axis(height, prob.shape[0])
    x0, x1, wx = axis(width, prob.shape[1])
    top = prob[y0][:, x0] * (1 - wx) + prob[y0][:, x1] * wx
    bottom = prob[y1][:, x0] * (1 - wx) + prob[y1][:, x1] * wx
    return top * (1 - wy[:, None]) + bottom * wy[:, None]


def lesion_stats(mask: np.ndarray) -> tuple[int, tuple[int, int, int, int] | None]:
    """Lesion area in pixels and bounding box (x_min, y_min, x_max, y_max), inclusive; None when empty."""
    area = int(mask.sum())
    if not area:
        return 0, None
    ys, xs = np.nonzero(mask)
    return area, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


# Class name colours on the overlay's dark header.
_CLASS_COLOURS = {"normal": (120, 220, 120), "benign": (255, 200, 70), "malignant": (255, 95, 95)}
_HEADER_BG = (24, 24, 24)
_TEXT = (235, 235, 235)


def _font(size: float) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=max(8, int(size)))
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def render_overlay(image: np.ndarray, mask: np.ndarray, class_names: Sequence[str], class_probs: np.ndarray,
                   title: str = "", min_width: int = 480) -> np.ndarray:
    """The image with the predicted lesion (translucent red fill + solid outline) under a header strip.

    Header: the predicted class and its probability in large type, then every class
    probability and the lesion area, then ``title``. Small images are enlarged (nearest
    neighbour, by a whole factor) to about ``min_width`` pixels wide so the text and
    outline stay readable.
    """
    h, w = mask.shape
    area, _ = lesion_stats(mask)
    factor = max(1, round(min_width / w))
    grey = image.astype(np.float32) / 255.0
    if factor > 1:
        grey = grey.repeat(factor, 0).repeat(factor, 1)
        mask = mask.repeat(factor, 0).repeat(factor, 1)
    width = w * factor
    thickness = max(2, round(max(mask.shape) / 250))
    picture = Image.fromarray(overlay_mask(grey, None, mask, thickness=thickness))

    predicted = int(np.argmax(class_probs))
    line1 = f"{class_names[predicted]}  {class_probs[predicted]:.2f}"
    line2 = "   ".join(f"{n} {p:.2f}" for n, p in zip(class_names, class_probs)) + f"   lesion {area:,} px"
    lines = [(line1, 1.0, _CLASS_COLOURS.get(class_names[predicted], _TEXT)), (line2, 0.62, _TEXT)]
    if title:
        lines.append((title, 0.5, (170, 170, 170)))
    pad = max(6, width // 60)
    base = min(72.0, max(16.0, width / 12))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while base > 10:  # shrink until every line fits the width
        if all(probe.textlength(t, font=_font(base * k)) <= width - 2 * pad for t, k, _ in lines):
            break
        base -= 1
    heights = [int(base * k * 1.25) for _, k, _ in lines]
    header = pad + sum(heights) + pad
    canvas = Image.new("RGB", (width, header + picture.height), _HEADER_BG)
    canvas.paste(picture, (0, header))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for (text, k, colour), lh in zip(lines, heights):
        draw.text((pad, y), text, fill=colour, font=_font(base * k))
        y += lh
    return np.asarray(canvas)


# --------------------------------------------------------------------------- the prediction loop
class BatchPredictor(Protocol):
    """What the loop needs from a model: uint8 images in, (bool mask at the image's size, class probs) out."""

    in_channels: int
    class_names: Sequence[str]

    def __call__(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]: ...


@dataclass
class PredictionSummary:
    output: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped_masks: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def report(self) -> str:
        counts = Counter(r["pred_class"] for r in self.rows)
        lines = [f"predicted {len(self.rows)} image(s) -> {self.output}"
                 + (f" ({', '.join(f'{n} {c}' for n, c in sorted(counts.items()))})" if counts else "")]
        if self.skipped_masks:
            lines.append(f"skipped {self.skipped_masks} mask file(s) (skip_masks)")
        if self.rows:
            lines.append(f"table: {self.output / CSV_NAME}")
        if self.failed:
            lines.append(f"FAILED {len(self.failed)} file(s):")
            lines += [f"  - {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)

    def failure_line(self, prog: str, log_file: Path | None = None) -> str | None:
        """The closing stderr line of a run with failed files (None without): how many, where they are listed,
        where the rest went."""
        if not self.failed:
            return None
        listed = f"listed above and in {log_file}" if log_file is not None else "listed above"
        return (f"{prog}: error: {len(self.failed)} file(s) could not be predicted ({listed}); the other "
                f"{len(self.rows)} are in {self.output}")


def _csv_columns(class_names: Sequence[str]) -> list[str]:
    return (["file", "pred_class"] + [f"prob_{n}" for n in class_names]
            + ["lesion_area_px", "bbox_x_min", "bbox_y_min", "bbox_x_max", "bbox_y_max", "width", "height",
               "mask", "overlay"])


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:  # the deployable predictor does not need rich
        return None
    return Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False)


def predict_files(predictor: BatchPredictor, images: list[InputImage], output: str | Path, *,
                  batch_size: int = 8, overlays: bool = True, progress: bool = False,
                  skipped_masks: int = 0, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PredictionSummary:
    """Predict every image, write its mask (and overlay) under ``output`` and ``predictions.csv``.

    A file that cannot be read or written is recorded in the summary and skipped; the
    others go on. Images are decoded and run ``batch_size`` at a time.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    output = Path(output).expanduser()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output {output}: cannot make the folder ({exc.__class__.__name__}: {exc.strerror or exc})"
                         ) from exc
    summary = PredictionSummary(output=output, skipped_masks=skipped_masks)
    stems = Counter((im.name.parent, im.name.stem) for im in images)
    class_names = list(predictor.class_names)

    def write(item: InputImage, image: np.ndarray, mask: np.ndarray, probs: np.ndarray) -> None:
        base = output_base(item.name, use_full_name=stems[(item.name.parent, item.name.stem)] > 1)
        mask_rel = PurePosixPath(f"{base}{MASK_SUFFIX}")
        overlay_rel = PurePosixPath(f"{base}{OVERLAY_SUFFIX}")
        mask_path = safe_output_path(output, mask_rel)
        overlay_path = safe_output_path(output, overlay_rel) if overlays else None
        save_png(mask.astype(np.uint8) * 255, mask_path)
        if overlay_path is not None:
            grey = image if image.ndim == 2 else image.mean(axis=-1)
            save_png(render_overlay(grey, mask, class_names, probs, title=item.name.as_posix()), overlay_path)
        area, box = lesion_stats(mask)
        row: dict[str, Any] = {"file": item.name.as_posix(), "pred_class": class_names[int(np.argmax(probs))]}
        row.update({f"prob_{n}": f"{p:.4f}" for n, p in zip(class_names, probs)})
        row.update({"lesion_area_px": area, "width": mask.shape[1], "height": mask.shape[0],
                    "mask": mask_rel.as_posix(), "overlay": overlay_rel.as_posix() if overlays else ""})
        for key, value in zip(("bbox_x_min", "bbox_y_min", "bbox_x_max", "bbox_y_max"), box or ("",) * 4):
            row[key] = value
        summary.rows.append(row)

    def flush(batch: list[tuple[InputImage, np.ndarray]]) -> None:
        results = predictor([image for _, image in batch])
        for (item, image), (mask, probs) in zip(batch, results):
            try:
                write(item, image, mask, np.asarray(probs, dtype=np.float64))
            except (OSError, InputError) as exc:
                reason = str(exc) if isinstance(exc, InputError) else f"cannot write its output ({exc})"
                summary.failed.append((str(item.path), reason))
                log.error("%s: %s", item.path, reason)

    bar = _progress(progress, len(images))
    task = bar.add_task("predict", total=len(images)) if bar else None
    if bar:
        bar.start()
    try:
        batch: list[tuple[InputImage, np.ndarray]] = []
        for item in images:
            try:
                batch.append((item, read_image(item.path, predictor.in_channels, max_pixels)))
                if min(batch[-1][1].shape[:2]) < TINY_SIDE:
                    log.warning("%s: %dx%d px, far smaller than an ultrasound scan; predicted (stretched to the "
                                "training size), but the result says little", item.path, batch[-1][1].shape[1],
                                batch[-1][1].shape[0])
            except InputError as exc:
                summary.failed.append((str(item.path), str(exc).removeprefix(f"{item.path}: ")))
                log.error("%s", exc)
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
            if bar:
                bar.advance(task)
        if batch:
            flush(batch)
    finally:
        if bar:
            bar.stop()

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_csv_columns(class_names), lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(summary.rows, key=lambda r: _natural_key(PurePosixPath(r["file"]))))
    write_bytes_atomic(output / CSV_NAME, buffer.getvalue().encode("utf-8"))
    return summary


# --------------------------------------------------------------------------- the ONNX model
def sidecar_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + SIDECAR_SUFFIX)


def read_sidecar(model_path: str | Path) -> dict[str, Any]:
    path = sidecar_path(model_path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        if Path(model_path).suffix == ".ckpt":
            raise InputError(f"{model_path}: a PyTorch checkpoint; export it first (python -m busiseg.export "
                             f"ckpt_path={model_path} writes {Path(model_path).stem}.onnx and its sidecar beside it), "
                             f"or run python -m busiseg.predict with it") from None
        raise InputError(f"{path}: sidecar not found; export the model with `python -m busiseg.export` "
                         f"(it writes {path.name} beside {Path(model_path).name})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the sidecar ({exc})") from exc
    missing = [k for k in ("image_size", "in_channels", "class_names", "threshold") if k not in meta]
    if missing:
        raise InputError(f"{path}: sidecar lacks the key(s) {', '.join(missing)}")
    return meta


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float32)))).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp((x - x.max(axis=1, keepdims=True)).astype(np.float32))
    return e / e.sum(axis=1, keepdims=True)


class OnnxPredictor:
    """An exported busiseg model in onnxruntime: uint8 images -> (mask at the image's size, class probabilities).

    Preprocessing is predict's: grey (or RGB) uint8, Pillow bilinear resize to the
    training size, /255 (normalisation is inside the model). The mask is the sigmoid
    probability, resized bilinearly to the original size, at or above ``threshold``.
    ``tta_flip`` averages with the mirrored image, as ``inference.tta_flip`` does. The
    component post-processing of ``busiseg.inference`` (and scale TTA) is not applied here.
    """

    def __init__(self, model_path: str | Path, threshold: float | None = None, tta_flip: bool | None = None,
                 providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise InputError(f"{self.model_path}: ONNX model not found")
        meta = read_sidecar(self.model_path)
        self.meta = meta
        self.image_size = int(meta["image_size"])
        self.in_channels = int(meta["in_channels"])
        self.class_names = list(meta["class_names"])
        self.threshold = float(meta["threshold"] if threshold is None else threshold)
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"threshold must be in (0, 1), got {self.threshold}")
        self.tta_flip = bool(meta.get("tta_flip", False) if tta_flip is None else tta_flip)
        try:
            self.session = ort.InferenceSession(str(self.model_path), providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InputError(f"{self.model_path}: onnxruntime cannot load the model ({exc})") from exc
        self.input_name = meta.get("input_name") or self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        self.output_names = [n for n in ("mask_logits", "class_logits") if n in names] or names[:2]

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxW[x3] -> float32 (C,S,S) in [0,1], resized as training and predict do."""
        s = self.image_size
        resized = np.asarray(Image.fromarray(image).resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0
        return resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)

    def probabilities(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mask probabilities (B,1,S,S) and class probabilities (B,K) for a prepared batch."""
        views = [False, True] if self.tta_flip else [False]
        mask_sum = class_sum = 0.0
        for flip in views:
            x = np.ascontiguousarray(batch[..., ::-1] if flip else batch)
            mask_logits, class_logits = self.session.run(self.output_names, {self.input_name: x})
            mask = _sigmoid(mask_logits)
            mask_sum = mask_sum + (mask[..., ::-1] if flip else mask)
            class_sum = class_sum + _softmax(class_logits)
        return mask_sum / len(views), class_sum / len(views)

    def __call__(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        batch = np.stack([self.prepare(im) for im in images]).astype(np.float32)
        mask_probs, class_probs = self.probabilities(batch)
        return [(resize_bilinear(mask_probs[i, 0], im.shape[:2]) >= self.threshold, class_probs[i])
                for i, im in enumerate(images)]


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m busiseg.onnx_predictor",
        description="Lesion masks, overlays and predictions.csv from an exported busiseg ONNX model "
                    "(needs onnxruntime, numpy and Pillow; reads MODEL.json beside the model).")
    parser.add_argument("model", help="model.onnx written by `python -m busiseg.export format=onnx`")
    parser.add_argument("input", help="an image, or a folder walked recursively")
    parser.add_argument("output", help="output folder; it mirrors the input names")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=None, help="mask threshold (default: the sidecar's)")
    parser.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                        help="average with the mirrored image (default: the sidecar's)")
    parser.add_argument("--skip-masks", choices=("auto", "true", "false"), default="auto",
                        help="skip files named like BUSI masks: auto = when their image sits beside them")
    parser.add_argument("--no-overlays", action="store_true", help="write masks and the table only")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse (skip and report) images with more pixels than this")
    parser.add_argument("--providers", default="CPUExecutionProvider",
                        help="onnxruntime execution providers, comma-separated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    skip: bool | str = {"true": True, "false": False}.get(args.skip_masks, "auto")
    try:
        output = Path(args.output)
        problem = output_folder_problem(output)
        if problem is not None:
            raise InputError(f"output {output}: {problem}")
        predictor = OnnxPredictor(args.model, threshold=args.threshold, tta_flip=args.tta_flip,
                                  providers=args.providers.split(","))
        if Path(args.input).is_dir() and Path(args.input).resolve() == output.resolve():
            raise InputError(f"output {output} is the input folder; choose another folder (a subfolder is fine)")
        images, skipped = find_images(args.input, skip, exclude=[output])
        if not images:
            raise InputError(f"{args.input}: no images found ({', '.join(IMAGE_SUFFIXES)})")
        summary = predict_files(predictor, images, output, batch_size=args.batch_size,
                                overlays=not args.no_overlays, progress=Path(args.input).is_dir() and len(images) > 1,
                                skipped_masks=len(skipped), max_pixels=args.max_pixels)
    except InputError as exc:
        print(f"busiseg.onnx_predictor: error: {exc}", file=sys.stderr)
        return 2
    print(summary.report())
    if summary.failed:
        print(summary.failure_line("busiseg.onnx_predictor"), file=sys.stderr)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())

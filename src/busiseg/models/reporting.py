"""Pictures of predictions: mask overlays and a labelled grid, rendered without pyplot.

Pure numpy / matplotlib / Pillow; nothing here knows about Lightning or torch, so it can
be used from a callback, a notebook or an evaluation script alike.

Colour code (the same everywhere):

* true lesion      -> green outline
* predicted lesion -> red/magenta translucent fill + outline
* panel title      -> green when the predicted class is right, red when wrong
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from busiseg.data.labels import CLASS_NAMES

__all__ = ["overlay_mask", "render_prediction_grid", "save_png"]

# RGB uint8 colours used in the overlays.
TRUE_COLOR = np.array([0, 230, 0], dtype=np.float32)  # green outline: ground truth
PRED_COLOR = np.array([255, 30, 90], dtype=np.float32)  # red/magenta: prediction
PRED_FILL_ALPHA = 0.35

# Matplotlib colours for titles and the legend.
_RIGHT_TITLE = "#1b7a2f"  # dark green, readable on white
_WRONG_TITLE = "#c81e1e"  # dark red
_NEUTRAL_TITLE = "#222222"

PANEL_INCHES = 3.0
DPI = 100


# --------------------------------------------------------------------------- helpers
def _to_grey(image: np.ndarray) -> np.ndarray:
    """Return a float32 HxW image in [0, 1] from HxW, 1xHxW/3xHxW or HxWx1/HxWx3 input.

    Values outside [0, 1] (e.g. a mean/std normalised image) are min-max rescaled so the
    picture stays visible instead of saturating.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        if img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
            img = img.mean(axis=0)  # channel first
        elif img.shape[-1] in (1, 3):
            img = img.mean(axis=-1)  # channel last
        else:
            raise ValueError(f"cannot interpret image of shape {img.shape} as grey or RGB")
    if img.ndim != 2:
        raise ValueError(f"expected an HxW image, got shape {np.asarray(image).shape}")
    img = np.nan_to_num(img, nan=0.0, posinf=1.0, neginf=0.0)
    lo, hi = float(img.min(initial=0.0)), float(img.max(initial=0.0))
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return np.clip(img, 0.0, 1.0)


def _to_bool_mask(mask: np.ndarray | None, shape: tuple[int, int], what: str) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.ndim == 3 and 1 in (m.shape[0], m.shape[-1]):
        m = m.reshape(m.shape[1:] if m.shape[0] == 1 else m.shape[:-1])
    if m.shape != shape:
        raise ValueError(f"{what} has shape {np.asarray(mask).shape}, image is {shape}")
    return m > 0.5 if m.dtype != bool else m


def _erode(mask: np.ndarray) -> np.ndarray:
    """One step of 3x3 (8-neighbour) binary erosion; outside the image counts as background."""
    p = np.pad(mask, 1, mode="constant", constant_values=False)
    h, w = mask.shape
    out = mask.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out &= p[dy : dy + h, dx : dx + w]
    return out


def contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Inner boundary of a boolean mask, ``thickness`` pixels wide (mask XOR eroded mask)."""
    eroded = mask
    for _ in range(max(1, int(thickness))):
        eroded = _erode(eroded)
    return mask & ~eroded


def _fit_text(text, canvas, max_width_px: float, min_size: float = 7.0) -> None:
    """Shrink a matplotlib Text's font until it is at most ``max_width_px`` wide."""
    renderer = canvas.get_renderer()
    size = text.get_fontsize()
    while size > min_size and text.get_window_extent(renderer).width > max_width_px:
        size -= 0.5
        text.set_fontsize(size)


def _auto_thickness(shape: tuple[int, int]) -> int:
    return max(1, round(max(shape) / 128))


# --------------------------------------------------------------------------- public API
def overlay_mask(
    image: np.ndarray,
    true_mask: np.ndarray | None,
    pred_mask: np.ndarray | None,
    thickness: int | None = None,
) -> np.ndarray:
    """Grey image plus masks -> HxWx3 uint8 RGB.

    ``pred_mask`` is drawn as a translucent red/magenta region with a solid outline,
    ``true_mask`` as a solid green outline on top (so both stay visible where they overlap).
    Masks are HxW (or 1xHxW), boolean or {0,1}/probabilities thresholded at 0.5; ``None``
    or an empty mask draws nothing. ``thickness`` is the outline width in image pixels
    (default: 1 px per 128 px of image side, at least 1).
    """
    grey = _to_grey(image)
    shape = grey.shape
    t = _auto_thickness(shape) if thickness is None else max(1, int(thickness))
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=-1)

    pred = _to_bool_mask(pred_mask, shape, "pred_mask")
    if pred is not None and pred.any():
        rgb[pred] = (1.0 - PRED_FILL_ALPHA) * rgb[pred] + PRED_FILL_ALPHA * PRED_COLOR
        rgb[contour(pred, t)] = PRED_COLOR

    true = _to_bool_mask(true_mask, shape, "true_mask")
    if true is not None and true.any():
        rgb[contour(true, t)] = TRUE_COLOR

    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render_prediction_grid(
    images: Sequence[np.ndarray],
    true_masks: Sequence[np.ndarray | None] | None,
    pred_masks: Sequence[np.ndarray | None] | None,
    true_labels: Sequence[int] | None,
    pred_labels: Sequence[int],
    probs: Sequence[float] | np.ndarray,
    class_names: Sequence[str] = CLASS_NAMES,
    ncols: int = 4,
    titles: Sequence[str] | None = None,
) -> np.ndarray:
    """One overlay panel per image in a grid; returns the figure as HxWx3 uint8 RGB.

    Each panel is titled ``"true: benign | pred: malignant 0.71"`` (green if the class is
    right, red if wrong); 0.71 is the probability of the predicted class. ``probs`` is
    either N confidences or an NxK array of class probabilities. ``titles`` (optional)
    adds a first title line per panel, e.g. the sample id. A legend line explains colours.
    """
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(images)
    if n == 0:
        raise ValueError("render_prediction_grid needs at least one image")

    def _seq(x, name):
        if x is None:
            return [None] * n
        if len(x) != n:
            raise ValueError(f"{name} has {len(x)} entries, expected {n}")
        return list(x)

    true_masks, pred_masks = _seq(true_masks, "true_masks"), _seq(pred_masks, "pred_masks")
    true_labels, titles = _seq(true_labels, "true_labels"), _seq(titles, "titles")
    pred_labels = [int(p) for p in _seq(pred_labels, "pred_labels")]
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim not in (1, 2) or probs.shape[0] != n:
        raise ValueError(f"probs must be (N,) or (N, K) with N={n}, got {probs.shape}")
    conf = probs[np.arange(n), pred_labels] if probs.ndim == 2 else probs

    def _name(c: int) -> str:
        return class_names[c] if 0 <= c < len(class_names) else str(c)

    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    extra_line = any(t for t in titles)
    title_in = 0.30 + (0.22 if extra_line else 0.0)
    legend_in = 0.40
    panel_px = PANEL_INCHES * DPI

    with rc_context({"font.size": 10, "image.interpolation": "antialiased", "axes.titlesize": 10.5}):
        fig = Figure(
            figsize=(ncols * PANEL_INCHES, nrows * (PANEL_INCHES + title_in) + legend_in),
            dpi=DPI,
            facecolor="white",
            layout="constrained",
        )
        canvas = FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if i >= n:
                continue
            grey = _to_grey(images[i])
            tmask = _to_bool_mask(true_masks[i], grey.shape, "true_masks[%d]" % i)
            pmask = _to_bool_mask(pred_masks[i], grey.shape, "pred_masks[%d]" % i)
            # Small images: enlarge (nearest) first so outlines can be thinner than one source pixel.
            f = int(panel_px // max(grey.shape))
            if f >= 2:
                grey, tmask, pmask = (None if a is None else a.repeat(f, 0).repeat(f, 1) for a in (grey, tmask, pmask))
            # Outline width chosen in *display* pixels (~2 px) so it survives the resampling.
            thickness = max(1, round(2 * max(grey.shape) / panel_px))
            ax.imshow(overlay_mask(grey, tmask, pmask, thickness=thickness))
            pred = pred_labels[i]
            text = f"pred: {_name(pred)} {conf[i]:.2f}"
            if true_labels[i] is None:
                color = _NEUTRAL_TITLE
            else:
                true = int(true_labels[i])
                text = f"true: {_name(true)} | {text}"
                color = _RIGHT_TITLE if true == pred else _WRONG_TITLE
            if titles[i]:
                text = f"{titles[i]}\n{text}"
            ax.set_title(text, color=color, fontweight="bold")

        handles = [
            Line2D([], [], color=TRUE_COLOR / 255, lw=2.5, label="green outline = true lesion"),
            Patch(
                facecolor=(*(PRED_COLOR / 255), PRED_FILL_ALPHA),
                edgecolor=PRED_COLOR / 255,
                lw=2,
                label="red = predicted",
            ),
            Line2D([], [], ls="none", label="title: green = class right, red = wrong"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False, fontsize=10)
        # Lay out once, then shrink any title wider than its panel and lay out again.
        canvas.draw()
        for ax in axes.flat[:n]:
            _fit_text(ax.title, canvas, max_width_px=0.97 * ax.get_window_extent().width)
        size = min(ax.title.get_fontsize() for ax in axes.flat[:n])  # same size everywhere
        for ax in axes.flat[:n]:
            ax.title.set_fontsize(size)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def save_png(array: np.ndarray, path) -> None:
    """Write an HxW or HxWx{3,4} image (uint8, or float in [0, 1]) to ``path`` atomically.

    The PNG is written to a temporary file in the same directory and moved into place
    with ``os.replace``, so a reader never sees a half-written file.
    """
    from PIL import Image

    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"expected HxW or HxWx3/4 image, got shape {arr.shape}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(arr).save(fh, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a PNG meant for viewers should be readable
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

"""Square crops around a lesion at the image's own resolution: what a second-stage classifier reads.

A box is ``(cy, cx, side)`` in pixels of the original image: the centre of the lesion's bounding
box and the longer of its two sides. ``square_crop`` cuts a square of ``side * margin`` around the
centre (zero where it leaves the image) and resizes it to ``size`` pixels, so a lesion fills the
same share of every crop whatever its size in the scan. Used by ``scripts/probe_lesion_crops.py``
(docs/results.md, e46).
"""

from __future__ import annotations

import cv2
import numpy as np

Box = tuple[float, float, float]


def lesion_box(mask: np.ndarray, min_side: float = 8.0) -> Box | None:
    """``(cy, cx, side)`` of the bounding box of a boolean mask's pixels; None for an empty mask.

    ``side`` is at least ``min_side`` pixels, so a speck still gets a crop with some context.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    return (y0 + y1) / 2, (x0 + x1) / 2, float(max(y1 - y0, x1 - x0, min_side))


def square_crop(image: np.ndarray, box: Box, margin: float, size: int,
                shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The square of side ``box side * margin`` centred on the box (moved by ``shift`` x that side, (dy, dx)),
    resized to ``size`` x ``size``; pixels outside the image are 0. Same dtype as ``image`` (H x W)."""
    if margin <= 0 or size < 1:
        raise ValueError(f"square_crop needs margin > 0 and size >= 1, got margin={margin}, size={size}")
    cy, cx, side = box
    side = side * margin
    cy, cx = cy + shift[0] * side, cx + shift[1] * side
    # cut the square at the image's own scale first (n x n pixels), then resize: cv2.warpAffine samples
    # bilinearly even when asked for INTER_AREA, which aliases a large lesion shrunk to a small crop
    n = max(1, int(round(side)))
    scale = n / side
    to_patch = np.float32([[scale, 0, -(cx - side / 2) * scale], [0, scale, -(cy - side / 2) * scale]])
    patch = cv2.warpAffine(image, to_patch, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=0)
    if n == size:
        return patch
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA if n > size else cv2.INTER_LINEAR)

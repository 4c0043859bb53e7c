"""Square crops around a lesion at the image's own resolution: what a second-stage classifier reads.

A box is ``(cy, cx, side)`` in pixels of the original image: the centre of the lesion's bounding
box and the longer of its two sides. ``square_crop`` cuts a square of ``side * margin`` around the
centre (zero where it leaves the image) and resizes it to ``size`` pixels, so a lesion fills the
same share of every crop whatever its size in the scan; ``paste_crop`` lays a crop-sized map back over the
scan. A normal scan has no lesion box: ``peak_box`` (the network's most suspicious spot) and
``normal_boxes`` (random and dark spots) give the boxes the crop stage learns "no lesion" on. Used by the
crop stage (``busiseg.models.crop_classifier``) and the probes in ``scripts/`` (docs/results.md, e46, e57).
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


def paste_crop(values: np.ndarray, box: Box, margin: float, shape: tuple[int, int],
               shift: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`square_crop`: a ``size`` x ``size`` map of the crop (float, e.g. a mask
    probability) laid back over an image of ``shape`` (H, W), bilinearly. Returns ``(values, coverage)``,
    both float32 (H, W): the pasted values (0 outside the square) and how much of each pixel the square covers
    (1 inside, 0 outside, in between on its edge), so that several pastes average as sum / coverage."""
    if margin <= 0 or values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"paste_crop needs margin > 0 and a square 2-D map, got margin={margin}, "
                         f"shape {values.shape}")
    size = values.shape[0]
    cy, cx, side = box
    side = side * margin
    cy, cx = cy + shift[0] * side, cx + shift[1] * side
    n = max(1, int(round(side)))
    # square_crop takes image x to patch (x - x0) * n / side, then resizes n -> size pixel-centre to pixel-centre;
    # so crop pixel q sits at image x = q * a + b with a = side / size
    a = side / size
    bx = cx - side / 2 + 0.5 * (a - side / n)
    by = cy - side / 2 + 0.5 * (a - side / n)
    to_crop = np.float32([[1 / a, 0, -bx / a], [0, 1 / a, -by / a]])  # image pixel -> crop pixel
    height, width = shape
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    pasted = cv2.warpAffine(values.astype(np.float32), to_crop, (width, height), flags=flags,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # coverage: the square's own extent (replicated edge inside, 0 beyond half a crop pixel outside)
    ones = np.pad(np.ones((size, size), np.float32), 1)
    to_padded = to_crop.copy()
    to_padded[:, 2] += 1
    coverage = cv2.warpAffine(ones, to_padded, (width, height), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0)
    return pasted * (coverage > 0), coverage


def peak_box(prob: np.ndarray) -> Box | None:
    """The box of the component around the peak of a mask-probability map, at half the peak (the region
    ``InferenceOptions.class_gating`` keeps): where a network would draw a lesion on a scan. None for an
    all-zero map."""
    if not prob.max() > 0:
        return None
    peak = np.unravel_index(int(np.argmax(prob)), prob.shape)
    _, labels = cv2.connectedComponents((prob >= 0.5 * prob.max()).astype(np.uint8))
    return lesion_box(labels == labels[peak])


def normal_boxes(grey: np.ndarray, n: int, sides: np.ndarray, g: np.random.Generator) -> list[Box]:
    """``n`` boxes on a scan without a lesion: the first at a random centre in the middle 80 %, the others on
    the darkest spot of the blurred scan inside a random half-size window (a network's false lesions are dark
    blobs). Each side is one of ``sides`` (lesion sides as shares of the scan's width) drawn by ``g``, times
    the width, clipped to 8 px .. the scan."""
    h, w = grey.shape
    blurred = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), max(2.0, w / 40))
    boxes = []
    for k in range(n):
        side = float(np.clip(g.choice(sides) * w, 8, min(h, w)))
        if k == 0:
            cy, cx = g.uniform(0.1 * h, 0.9 * h), g.uniform(0.1 * w, 0.9 * w)
        else:
            y0, x0 = int(g.uniform(0, 0.5 * h)), int(g.uniform(0, 0.5 * w))
            window = blurred[y0:y0 + h // 2, x0:x0 + w // 2]
            dy, dx = np.unravel_index(int(window.argmin()), window.shape)
            cy, cx = float(y0 + dy), float(x0 + dx)
        boxes.append((cy, cx, side))
    return boxes

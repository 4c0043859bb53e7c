"""Near-duplicate detection: which images show the same scan.

BUSI holds copies of one scan cropped differently, rescaled, with and without burned-in
calipers, sometimes filed under two classes (see docs/data.md). A content hash finds only
byte-identical pixels; this module finds the rest in two stages, so that the cost grows with
the number of images, not with the number of pairs times the image size:

1. **Shortlist.** Every image gets a few tiny thumbnails (``thumb_size`` square, zero mean,
   unit norm): the whole image and its centre at ``views`` of the width and height. The
   whole-image thumbnail of each image is compared with every view of every other image in one
   (blocked) matrix product; each image's ``neighbours`` most similar images become
   candidates. Views make a re-crop resemble the centre of the wider image.
2. **Verification** of each candidate pair, both ways round: the centre of one image
   (``template_fraction`` of its width and height) is searched in the other with normalised
   cross-correlation (``cv2.matchTemplate``) at every scale between ``1/max_scale`` and
   ``max_scale`` (steps of ``scale_step``, plus the two scales a same-pixel-size re-crop or a
   whole-image rescale would have) on small grey images of ``coarse_area`` pixels. At the best
   shift and scale the same comparison is repeated on high-passed images of ``fine_area``
   pixels, in a small window. The high-pass keeps the speckle, which is unique to one
   acquisition: two different scans score about 0 (rarely above 0.2, see docs/data.md) however
   alike their anatomy; copies of one scan score 0.5 to 1 even when rescaled or carrying
   calipers, text or boxes. ``score >= threshold`` joins two images; groups are the connected
   components, plus every set of exact copies.

Neighbouring frames of one lesion (a new acquisition, new speckle) score between the two and
are grouped only when their anatomy also agrees closely at the coarse size (``coarse >=
frame_coarse``); the rest of ``review_threshold <= score < threshold`` is listed for review.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np

__all__ = [
    "DuplicateParams",
    "Fingerprint",
    "PairMatch",
    "connected_components",
    "content_digest",
    "dhash",
    "find_duplicates",
    "fingerprint",
    "match_pair",
    "shortlist",
]


@dataclass(frozen=True)
class DuplicateParams:
    """Settings of the detector (config: ``split.duplicates.*`` and ``duplicates.*`` in audit.yaml).

    threshold: fine-scale score from which two images count as one scan (grouped).
    review_threshold: pairs scoring between this and ``threshold`` are listed for a human look.
    frame_coarse: ... unless their coarse (anatomy) correlation is at least this: then they are
        grouped as neighbouring frames of one lesion (set above 1 to group same-scan copies only).
    neighbours: candidates per image from the shortlist.
    thumb_size: side of the shortlist thumbnails.
    views: centre fractions (of width and height) whose thumbnails each image also offers.
    coarse_area / fine_area: pixel count (as sqrt(h*w)) of the search and the verification images.
    template_fraction: share of width and height of the centre searched in the other image.
    max_scale, scale_step: range and step of the scale search.
    highpass_sigma: Gaussian sigma (fine pixels) removed before the speckle comparison.
    """

    threshold: float = 0.3
    review_threshold: float = 0.15
    frame_coarse: float = 0.95
    neighbours: int = 5
    thumb_size: int = 16
    views: tuple[float, ...] = (1.0, 0.8, 0.64)
    coarse_area: int = 128
    fine_area: int = 320
    template_fraction: float = 0.6
    max_scale: float = 1.6
    scale_step: float = 1.05
    highpass_sigma: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "views", tuple(float(v) for v in self.views))
        checks = [
            ("threshold", 0.0 < self.threshold <= 1.0, "in (0, 1]"),
            ("review_threshold", 0.0 <= self.review_threshold <= self.threshold, "in [0, threshold]"),
            ("frame_coarse", 0.0 < self.frame_coarse, "> 0"),
            ("neighbours", int(self.neighbours) >= 1, ">= 1"),
            ("thumb_size", 4 <= int(self.thumb_size) <= 64, "in [4, 64]"),
            ("views", bool(self.views) and all(0.3 <= v <= 1.0 for v in self.views), "fractions in [0.3, 1]"),
            ("coarse_area", 32 <= int(self.coarse_area) <= int(self.fine_area), "in [32, fine_area]"),
            ("template_fraction", 0.2 <= self.template_fraction <= 0.9, "in [0.2, 0.9]"),
            ("max_scale", 1.0 <= self.max_scale <= 4.0, "in [1, 4]"),
            ("scale_step", 1.0 < self.scale_step <= 1.5, "in (1, 1.5]"),
            ("highpass_sigma", self.highpass_sigma > 0, "> 0"),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ValueError(f"duplicates.{key} must be {what}, got {getattr(self, key)}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["views"] = list(self.views)
        return d


@dataclass
class Fingerprint:
    """What the detector keeps of one image (about 120 KB at the default sizes)."""

    digest: str  # SHA-256 of the decoded pixels (exact copies)
    size: tuple[int, int]  # original (height, width)
    views: np.ndarray  # (len(views), thumb_size**2) float32, zero mean, unit norm
    coarse: np.ndarray  # uint8 grey, coarse_area pixels
    fine: np.ndarray  # int8 high-passed grey (clipped to +-127), fine_area pixels


@dataclass(frozen=True)
class PairMatch:
    """Verification of one candidate pair: ``score`` is the fine (speckle) correlation."""

    i: int
    j: int
    score: float
    coarse: float
    scale: float  # size of i's content relative to j's, both at the coarse area
    kind: str = "near"  # "exact" (same pixels), "near" (same scan) or "frame" (neighbouring frame)


# --------------------------------------------------------------------------- per image


def content_digest(image: np.ndarray) -> str:
    """SHA-256 of shape and pixels: equal for exact copies, whatever the PNG encoding."""
    h = hashlib.sha256(repr(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def to_grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)


def _resize_to_area(grey: np.ndarray, area: int) -> np.ndarray:
    """Resize keeping the aspect so that sqrt(h*w) == area; float32."""
    h, w = grey.shape
    f = area / math.sqrt(h * w)
    size = (max(8, round(w * f)), max(8, round(h * f)))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    return cv2.resize(grey, size, interpolation=interp).astype(np.float32)


def _centre(a: np.ndarray, fraction: float) -> np.ndarray:
    h, w = a.shape[:2]
    dh, dw = round(h * (1 - fraction) / 2), round(w * (1 - fraction) / 2)
    return a[dh : h - dh, dw : w - dw]


def _unit(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float32).ravel()
    v = v - v.mean()
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-6 else v


def fingerprint(image: np.ndarray, params: DuplicateParams) -> Fingerprint:
    """Fingerprint of a uint8 image (HxW grey or HxWx3 RGB) at its original size."""
    grey = to_grey(image)
    s = int(params.thumb_size)
    views = np.stack(
        [_unit(cv2.resize(_centre(grey, v), (s, s), interpolation=cv2.INTER_AREA)) for v in params.views]
    )
    fine = _resize_to_area(grey, params.fine_area)
    fine = fine - cv2.GaussianBlur(fine, (0, 0), params.highpass_sigma)
    return Fingerprint(
        digest=content_digest(image),
        size=(int(grey.shape[0]), int(grey.shape[1])),
        views=views,
        coarse=np.clip(np.round(_resize_to_area(grey, params.coarse_area)), 0, 255).astype(np.uint8),
        fine=np.clip(np.round(fine), -127, 127).astype(np.int8),
    )


def dhash(grey: np.ndarray, bits: int = 8) -> int:
    """The classic 64-bit difference hash (a "plain perceptual hash"), for comparison in the audit."""
    small = cv2.resize(grey, (bits + 1, bits), interpolation=cv2.INTER_AREA).astype(np.int16)
    diff = (small[:, 1:] > small[:, :-1]).ravel()
    return int("".join("1" if d else "0" for d in diff), 2)


# --------------------------------------------------------------------------- shortlist


def shortlist(views: np.ndarray, neighbours: int, block: int = 256) -> set[tuple[int, int]]:
    """Candidate pairs ``(i, j)``, i < j: each image with its ``neighbours`` nearest others.

    ``views``: (N, V, D) unit vectors, view 0 = whole image. Row i scores every other image j
    by the best match of i's whole image with any view of j (so a re-crop finds the image it
    was cut from). Cost: N^2 V D multiply-adds, computed ``block`` rows at a time (memory
    ``block * N * V`` floats), then a top-k per row.
    """
    n = views.shape[0]
    k = min(int(neighbours), n - 1)
    pairs: set[tuple[int, int]] = set()
    if k <= 0:
        return pairs
    whole = np.ascontiguousarray(views[:, 0, :], dtype=np.float32)
    flat = np.ascontiguousarray(views.reshape(n * views.shape[1], -1), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        sim = (whole[start:stop] @ flat.T).reshape(stop - start, n, -1).max(axis=2)
        rows = np.arange(stop - start)
        sim[rows, rows + start] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        for r, cols in enumerate(top):
            i = start + r
            pairs.update((min(i, int(j)), max(i, int(j))) for j in cols)
    return pairs


# --------------------------------------------------------------------------- verification


def _ncc_max(image: np.ndarray, template: np.ndarray) -> tuple[float, tuple[int, int]]:
    r = cv2.matchTemplate(image, template, cv2.TM_CCOEFF_NORMED)
    r = np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)  # flat regions give 0/0
    _, best, _, loc = cv2.minMaxLoc(r)
    return float(min(best, 1.0)), loc


def _scaled(template: np.ndarray, s: float) -> np.ndarray | None:
    th, tw = round(template.shape[0] * s), round(template.shape[1] * s)
    if th < 8 or tw < 8:
        return None
    return cv2.resize(template, (tw, th), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def _scales(params: DuplicateParams, hypotheses: Iterable[float]) -> list[float]:
    n = math.ceil(math.log(params.max_scale) / math.log(params.scale_step))
    grid = [params.scale_step**k for k in range(-n, n + 1)]
    extra = [h for h in hypotheses if 1 / params.max_scale <= h <= params.max_scale]
    return sorted(set(grid) | set(extra))


def _one_way(x: Fingerprint, y: Fingerprint, params: DuplicateParams) -> tuple[float, float, float]:
    """Search y's centre in x: (fine score, coarse score, scale)."""
    # same-pixel-size re-crop: content keeps its pixel size; whole-image rescale: scale 1 at equal area
    same_pixels = math.sqrt((y.size[0] * y.size[1]) / (x.size[0] * x.size[1]))
    x_coarse = x.coarse.astype(np.float32)
    template = _centre(y.coarse, params.template_fraction).astype(np.float32)
    best = (-1.0, 1.0, (0, 0))
    for s in _scales(params, (1.0, same_pixels)):
        t = _scaled(template, s)
        if t is None or t.shape[0] > x_coarse.shape[0] or t.shape[1] > x_coarse.shape[1]:
            continue
        score, loc = _ncc_max(x_coarse, t)
        if score > best[0]:
            best = (score, s, loc)
    coarse, s, loc = best
    if coarse <= -1.0:
        return -1.0, -1.0, 1.0
    # the same alignment at the fine size, on the high-passed images, in a small window
    rx = x.fine.shape[1] / x.coarse.shape[1]
    ry = y.fine.shape[1] / y.coarse.shape[1]
    x_fine = x.fine.astype(np.float32)
    y_centre = _centre(y.fine, params.template_fraction).astype(np.float32)
    pad = max(2, round(0.02 * math.sqrt(x_fine.size)))
    px, py = round(loc[0] * rx), round(loc[1] * rx)
    fine = -1.0
    for k in (0.985, 1.0, 1.015):
        t = _scaled(y_centre, s * rx / ry * k)
        if t is None:
            continue
        th, tw = t.shape
        x0, y0 = max(0, px - pad), max(0, py - pad)
        window = x_fine[y0 : min(x_fine.shape[0], py + th + pad), x0 : min(x_fine.shape[1], px + tw + pad)]
        if window.shape[0] < th or window.shape[1] < tw:
            continue
        fine = max(fine, _ncc_max(window, t)[0])
    return fine, coarse, s


def match_pair(a: Fingerprint, b: Fingerprint, params: DuplicateParams, i: int = 0, j: int = 1) -> PairMatch:
    """Verify one pair both ways round; the better way decides."""
    if a.digest == b.digest:
        return PairMatch(i, j, 1.0, 1.0, 1.0, "exact")
    fwd = _one_way(a, b, params)
    bwd = _one_way(b, a, params)
    if fwd[0] >= bwd[0]:
        return PairMatch(i, j, round(fwd[0], 4), round(fwd[1], 4), round(fwd[2], 4))
    return PairMatch(i, j, round(bwd[0], 4), round(bwd[1], 4), round(1.0 / bwd[2], 4))


# --------------------------------------------------------------------------- groups


def connected_components(n: int, edges: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Groups of 2+ indices joined by edges (union-find), each sorted, ordered by first member."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in edges:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for x in range(n):
        groups.setdefault(root(x), []).append(x)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


@dataclass
class DuplicateResult:
    """Groups (indices into the fingerprints) and the verified pairs behind them."""

    groups: list[list[int]]
    exact_groups: list[list[int]]
    pairs: list[PairMatch]  # grouped pairs (score >= threshold) and exact copies
    review: list[PairMatch]  # review_threshold <= score < threshold, not already in one group
    candidates: int = 0
    scores: list[float] = field(default_factory=list)  # every verified candidate's score


def find_duplicates(
    fingerprints: Sequence[Fingerprint],
    params: DuplicateParams,
    workers: int | None = None,
    progress: Callable[[Iterable, int], Iterable] | None = None,
) -> DuplicateResult:
    """Exact copies by digest, near duplicates by shortlist + verification (see the module doc).

    ``progress(iterable, total)``, if given, wraps the verification results (e.g. a progress bar).
    """
    n = len(fingerprints)
    by_digest: dict[str, list[int]] = {}
    for k, fp in enumerate(fingerprints):
        by_digest.setdefault(fp.digest, []).append(k)
    exact_groups = sorted((g for g in by_digest.values() if len(g) > 1), key=lambda g: g[0])
    exact_pairs = {(g[0], m) for g in exact_groups for m in g[1:]}

    if n >= 2:
        views = np.stack([fp.views for fp in fingerprints])
        candidates = sorted(shortlist(views, params.neighbours))
    else:
        candidates = []
    todo = [p for p in candidates if fingerprints[p[0]].digest != fingerprints[p[1]].digest]

    def verify(p: tuple[int, int]) -> PairMatch:
        return match_pair(fingerprints[p[0]], fingerprints[p[1]], params, p[0], p[1])

    workers = workers or min(4, os.cpu_count() or 1)
    # OpenCV releases the GIL in matchTemplate/resize: threads overlap; its own pool would oversubscribe.
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(verify, todo)
            if progress is not None:
                results = progress(results, len(todo))
            matches = list(results)
    finally:
        cv2.setNumThreads(previous)

    grouped = [m for m in matches if m.score >= params.threshold]
    grouped += [
        replace(m, kind="frame")
        for m in matches
        if params.review_threshold <= m.score < params.threshold and m.coarse >= params.frame_coarse
    ]
    review = sorted(
        (
            m
            for m in matches
            if params.review_threshold <= m.score < params.threshold and m.coarse < params.frame_coarse
        ),
        key=lambda m: -m.score,
    )
    pairs = [PairMatch(i, j, 1.0, 1.0, 1.0, "exact") for i, j in sorted(exact_pairs)] + sorted(
        grouped, key=lambda m: (m.i, m.j)
    )
    groups = connected_components(n, [(m.i, m.j) for m in pairs])
    group_of = {k: g[0] for g in groups for k in g}
    review = [m for m in review if group_of.get(m.i, -1 - m.i) != group_of.get(m.j, -1 - m.j)]
    return DuplicateResult(
        groups=groups,
        exact_groups=exact_groups,
        pairs=pairs,
        review=review,
        candidates=len(candidates),
        scores=[m.score for m in matches],
    )

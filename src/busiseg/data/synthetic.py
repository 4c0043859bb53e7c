"""Synthetic breast-ultrasound phantom, written in the BUSI folder layout.

The phantom is the default dataset: it needs no download, and because it is
written exactly like BUSI (``ROOT/<class>/<class> (<n>).png`` plus
``_mask.png`` / ``_mask_<k>.png``) the same reader reads both.

Every image is drawn from its own generator, seeded by
``(seed, class id, image number)``, so an image never depends on the order of
generation or on the other images.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from busiseg.data.labels import CLASS_NAMES, LABEL_OF

PHANTOM_MARKER = ".busiseg_phantom.json"
# Bump when the generated pixels change, so an old phantom is not silently reused.
PHANTOM_VERSION = 1
DEFAULT_N_PER_CLASS: dict[str, int] = {"benign": 80, "malignant": 80, "normal": 50}
MIN_IMAGE_SIZE = 32

# Share of lesion images that get a second, smaller lesion in `_mask_1.png`.
_MULTI_LESION_RATE = 0.05
# Share of images saved as 'L' rather than RGB, and of lesion masks saved as 'L' rather than '1'.
_GREY_IMAGE_RATE = 0.15
_GREY_MASK_RATE = 0.2


# --------------------------------------------------------------------------- parameters


def _phantom_params(
    n_per_class: Mapping[str, int] | None, seed: int, min_size: int, max_size: int
) -> dict:
    """Validate the generation parameters and return them as the marker's content."""
    counts = dict(DEFAULT_N_PER_CLASS)
    unknown = set(n_per_class or {}) - set(CLASS_NAMES)
    if unknown:
        raise ValueError(f"unknown class names {sorted(unknown)}; expected {list(CLASS_NAMES)}")
    counts.update({k: operator.index(v) for k, v in (n_per_class or {}).items()})
    if any(v < 0 for v in counts.values()):
        raise ValueError(f"image counts must be >= 0, got {counts}")
    seed, min_size, max_size = (operator.index(v) for v in (seed, min_size, max_size))
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not MIN_IMAGE_SIZE <= min_size <= max_size:
        raise ValueError(f"need {MIN_IMAGE_SIZE} <= min_size <= max_size, got {min_size}/{max_size}")
    return {
        "format": "busiseg-phantom",
        "version": PHANTOM_VERSION,
        "seed": seed,
        "n_per_class": {name: counts[name] for name in CLASS_NAMES},
        "min_size": min_size,
        "max_size": max_size,
    }


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / PHANTOM_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- filtering


def _box(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Moving average of width 2r+1 along one axis (edges repeated), via cumsum."""
    if r <= 0:
        return a
    a = np.moveaxis(a, axis, 0)
    p = np.concatenate([np.repeat(a[:1], r + 1, 0), a, np.repeat(a[-1:], r, 0)]).astype(np.float32)
    c = np.cumsum(p, axis=0)
    out = (c[2 * r + 1 :] - c[: -(2 * r + 1)]) * np.float32(1.0 / (2 * r + 1))
    return np.moveaxis(out, 0, axis)


def _blur(a: np.ndarray, ry: int, rx: int, passes: int = 2) -> np.ndarray:
    """Separable blur; two box passes already look close to a Gaussian."""
    for _ in range(passes):
        a = _box(_box(a, ry, 0), rx, 1)
    return a


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], ry: int, rx: int) -> np.ndarray:
    """Zero-mean, unit-std correlated noise (tissue heterogeneity at a given scale)."""
    # Blur a larger field and crop: edge padding would otherwise leave streaks at the borders.
    h, w = shape
    n = _blur(rng.standard_normal((h + 4 * ry, w + 4 * rx)).astype(np.float32), ry, rx)
    n = n[2 * ry : 2 * ry + h, 2 * rx : 2 * rx + w]
    return (n - n.mean()) / (n.std() + 1e-6)


def _step(d: np.ndarray, width: float) -> np.ndarray:
    """Soft 0->1 transition where d crosses 0 (tissue boundaries are not razor sharp)."""
    return 1.0 / (1.0 + np.exp(-np.clip(d / width, -30, 30)))


# --------------------------------------------------------------------------- tissue


def _wavy(rng: np.random.Generator, x: np.ndarray, depth: float, amp: float) -> np.ndarray:
    """A gently undulating boundary depth (fraction of height) as a function of x."""
    out = np.full_like(x, depth)
    for freq in rng.uniform(0.5, 2.5, size=2):
        out += amp * rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * freq * x + rng.uniform(0, 2 * np.pi))
    return out


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Echogenicity map: skin line, dark fat, bright glandular layer, deeper muscle."""
    y = (np.arange(h, dtype=np.float32) / h)[:, None]
    x = (np.arange(w, dtype=np.float32) / w)[None, :]
    skin = _wavy(rng, x, rng.uniform(0.025, 0.06), 0.006)
    fat_end = _wavy(rng, x, rng.uniform(0.16, 0.3), 0.035)
    gland_end = _wavy(rng, x, rng.uniform(0.62, 0.82), 0.04)

    fat, gland, deep = rng.uniform(0.22, 0.38), rng.uniform(0.75, 0.95), rng.uniform(0.35, 0.55)
    echo = fat + (gland - fat) * _step(y - fat_end, 0.02) + (deep - gland) * _step(y - gland_end, 0.025)
    echo = echo * (1.0 - 0.9 * _step(skin - 0.012 - y, 0.004))  # coupling gel above the skin is dark
    echo = echo + 0.7 * np.exp(-(((y - skin) / 0.008) ** 2))  # bright skin line

    # Fat lobules (blobby) and fibroglandular streaks / muscle fibres (laterally elongated).
    lobules = _smooth_noise(rng, (h, w), max(2, h // 20), max(2, w // 16))
    streaks = _smooth_noise(rng, (h, w), 1, max(3, w // 10))
    texture = 1.0 + 0.22 * lobules + 0.18 * streaks
    return np.clip(echo * texture, 0.02, None).astype(np.float32)


def _speckle(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multiplicative Rayleigh speckle, mean 1, laterally elongated like a real beam's."""
    s = _blur(rng.rayleigh(1.0, (h, w)).astype(np.float32), 0, 1, passes=1)
    return s / s.mean()


def _attenuation(rng: np.random.Generator, h: int) -> np.ndarray:
    """Depth attenuation, as a column vector (deep tissue returns less echo)."""
    y = np.arange(h, dtype=np.float32)[:, None] / h
    return np.exp(-rng.uniform(0.5, 1.3) * y).astype(np.float32)


# --------------------------------------------------------------------------- lesions


def _lesion_mask(
    rng: np.random.Generator, h: int, w: int, kind: str, radius: float, avoid: np.ndarray | None = None
) -> np.ndarray | None:
    """A lesion mask of the given class style; None if it cannot be placed clear of `avoid`."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    reach = radius if kind == "benign" else radius * 1.9  # harmonics + spikes stick out this far
    for _ in range(30):
        # Lesions sit mostly in the glandular layer; a second one may go wider to find room.
        y_zone, x_zone = ((0.3, 0.75), (0.2, 0.8)) if avoid is None else ((0.2, 0.9), (0.05, 0.95))
        cy = _uniform_within(rng, y_zone[0] * h, y_zone[1] * h, reach + 2, h - reach - 2)
        cx = _uniform_within(rng, x_zone[0] * w, x_zone[1] * w, reach + 2, w - reach - 2)
        theta0 = rng.uniform(-np.pi, np.pi)
        dy, dx = yy - cy, xx - cx
        if kind == "benign":
            mask = _oval(rng, dy, dx, radius)
        else:
            mask = _spiculated(rng, dy, dx, radius, theta0)
        if avoid is None or not (mask & _dilate(avoid, max(2, int(radius) // 2))).any():
            return mask
    return None


def _uniform_within(
    rng: np.random.Generator, lo: float, hi: float, lo_hard: float, hi_hard: float
) -> float:
    """Uniform in [lo, hi] narrowed to [lo_hard, hi_hard]; the midpoint if nothing is left."""
    lo, hi = max(lo, lo_hard), min(hi, hi_hard)
    return rng.uniform(lo, hi) if hi > lo else (lo_hard + hi_hard) / 2


def _oval(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Smooth ellipse, wider than tall (benign masses lie parallel to the skin)."""
    a, b = radius, radius * rng.uniform(0.5, 0.9)
    t = rng.uniform(-0.5, 0.5)
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _spiculated(
    rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, radius: float, theta0: float
) -> np.ndarray:
    """Irregular star-like lesion: radius modulated by random harmonics plus narrow spikes."""
    # Malignant masses are often taller than wide: squash x before taking polar coordinates.
    rho = np.hypot(dy, dx * rng.uniform(1.0, 1.4))
    theta = np.arctan2(dy, dx) - theta0
    r = np.ones_like(rho)
    for k in range(2, 9):
        r += rng.uniform(0.0, 0.28 / k**0.6) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for phi in rng.uniform(-np.pi, np.pi, size=rng.integers(5, 12)):
        d = np.abs((theta - phi + np.pi) % (2 * np.pi) - np.pi)  # wrapped angular distance
        width = rng.uniform(0.06, 0.14)
        r += rng.uniform(0.2, 0.6) * np.clip(1.0 - d / width, 0.0, None) ** 2
    return rho <= radius * np.clip(r, 0.4, None)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    return _box(_box(mask.astype(np.float32), r, 0), r, 1) > 1e-3


def _posterior(rng: np.random.Generator, mask: np.ndarray, kind: str) -> np.ndarray:
    """Gain map below a lesion: acoustic enhancement (benign) or shadowing (malignant)."""
    h, w = mask.shape
    cols = mask.any(axis=0)
    bottom = h - 1 - np.argmax(mask[::-1], axis=0)  # deepest lesion row per column
    rows = np.arange(h)[:, None]
    below = (rows > bottom[None, :]) & cols[None, :]
    depth = (rows - bottom[None, :]).astype(np.float32) / h
    if kind == "benign":
        profile = np.exp(-depth / rng.uniform(0.15, 0.4)) * rng.uniform(0.15, 0.4)
        gain = 1.0 + below * profile
    else:
        # The shadow fades in just below the lesion and runs to the bottom of the image.
        ramp = np.clip(depth * h / 6.0, 0.0, 1.0)
        gain = 1.0 - below * ramp * rng.uniform(0.45, 0.75)
    gain = _blur(gain.astype(np.float32), 1, max(2, int(cols.sum()) // 8))
    return np.where(mask, 1.0, gain).astype(np.float32)


def _paint_lesion(
    rng: np.random.Generator, echo: np.ndarray, mask: np.ndarray, kind: str, lesions: np.ndarray
) -> None:
    """Make the lesion hypoechoic, in place, with an echogenic rim outside every lesion."""
    h, w = echo.shape
    level = rng.uniform(0.06, 0.3) if kind == "benign" else rng.uniform(0.1, 0.32)
    inner = _smooth_noise(rng, (h, w), 3, 3)
    # Malignant interiors are more heterogeneous than the fairly uniform benign ones.
    spread = 0.15 if kind == "benign" else 0.35
    echo[mask] = (level * np.clip(1.0 + spread * inner, 0.3, None))[mask]
    halo_width = rng.integers(1, 3) if kind == "benign" else rng.integers(2, 5)
    halo = _dilate(mask, int(halo_width)) & ~lesions
    echo[halo] *= rng.uniform(1.1, 1.35)


# --------------------------------------------------------------------------- one image


def _render(
    rng: np.random.Generator, kind: str, h: int, w: int, second_lesion: bool
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render one grey uint8 image and its lesion masks (one bool array per lesion)."""
    echo = _tissue(rng, h, w)
    masks: list[np.ndarray] = []
    if kind != "normal":
        short = min(h, w)
        # Leave room for a second lesion when one is planned.
        radius = short * rng.uniform(0.1, 0.2 if second_lesion else 0.3)
        masks.append(_lesion_mask(rng, h, w, kind, radius))
        if second_lesion:
            extra = _lesion_mask(rng, h, w, kind, short * rng.uniform(0.06, 0.1), avoid=masks[0])
            if extra is not None:
                masks.append(extra)
        for m in masks:
            echo *= _posterior(rng, m, kind)
        lesions = np.logical_or.reduce(masks)
        for m in masks:
            _paint_lesion(rng, echo, m, kind, lesions)
    img = echo * _speckle(rng, h, w) * _attenuation(rng, h)
    img = img / np.quantile(img, 0.995) * rng.uniform(0.8, 0.95)
    # Display gamma < 1 mimics the log compression of real scanners.
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.7, 0.9)
    return np.round(img * 255).astype(np.uint8), masks


def _image_numbers(seed: int, class_id: int, n: int) -> tuple[list[int], set[int]]:
    """Image numbers 1.. with a few gaps, and which of them get a second lesion."""
    rng = np.random.default_rng([seed, class_id, 0])  # 0 is never an image number
    gaps = n // 25 + (1 if n >= 4 else 0)
    numbers = sorted(int(k) for k in rng.choice(np.arange(1, n + gaps + 1), size=n, replace=False))
    n_multi = max(1, round(_MULTI_LESION_RATE * n)) if n >= 2 and class_id != LABEL_OF["normal"] else 0
    multi = {int(k) for k in rng.choice(numbers, size=n_multi, replace=False)} if n_multi else set()
    return numbers, multi


def _write_image(
    folder: Path, kind: str, number: int, seed: int, sizes: tuple[int, int], second_lesion: bool
) -> None:
    rng = np.random.default_rng([seed, LABEL_OF[kind], number])
    h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
    grey, masks = _render(rng, kind, h, w, second_lesion)
    stem = folder / f"{kind} ({number})"
    image = Image.fromarray(grey)
    # Speckle does not compress; the lowest level keeps generation fast.
    image = image if rng.random() < _GREY_IMAGE_RATE else image.convert("RGB")
    image.save(f"{stem}.png", compress_level=1)
    if not masks:
        # Real BUSI normal masks are all-zero RGB images.
        Image.new("RGB", (w, h)).save(f"{stem}_mask.png", compress_level=1)
        return
    grey_masks = rng.random() < _GREY_MASK_RATE
    for k, m in enumerate(masks):
        suffix = "_mask" if k == 0 else f"_mask_{k}"
        out = Image.fromarray(m.astype(np.uint8) * 255)
        out = out if grey_masks else out.convert("1", dither=Image.Dither.NONE)
        out.save(f"{stem}{suffix}.png", compress_level=1)


def _write_phantom(root: Path, params: dict) -> None:
    """Write all classes into an existing empty folder, the marker last."""
    sizes = (params["min_size"], params["max_size"])
    for kind in CLASS_NAMES:
        folder = root / kind
        folder.mkdir()
        numbers, multi = _image_numbers(params["seed"], LABEL_OF[kind], params["n_per_class"][kind])
        for number in numbers:
            _write_image(folder, kind, number, params["seed"], sizes, number in multi)
    (root / PHANTOM_MARKER).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- public API


def _has_entries(root: Path) -> bool:
    return root.exists() and (not root.is_dir() or any(root.iterdir()))


def generate_phantom(
    root: str | Path,
    n_per_class: Mapping[str, int] | None = None,
    seed: int = 0,
    min_size: int = 160,
    max_size: int = 256,
) -> Path:
    """Write the phantom into root (created; must be empty or absent, else ValueError). Returns root."""
    root = Path(root).expanduser()
    params = _phantom_params(n_per_class, seed, min_size, max_size)
    if _has_entries(root):
        raise ValueError(f"{root} is not empty; the phantom needs an empty or absent folder")
    root.mkdir(parents=True, exist_ok=True)
    _write_phantom(root, params)
    return root


def ensure_phantom(
    root: str | Path,
    n_per_class: Mapping[str, int] | None = None,
    seed: int = 0,
    min_size: int = 160,
    max_size: int = 256,
) -> Path:
    """Reuse root if its marker matches these params, else generate it if absent or empty.

    A non-empty root with another (or no) marker raises ValueError. Generation
    goes to a temporary sibling that is renamed into place, so a killed run
    never leaves a half-written dataset under root.
    """
    root = Path(root).expanduser()
    params = _phantom_params(n_per_class, seed, min_size, max_size)
    if _has_entries(root):
        if _read_marker(root) == params:
            return root
        raise ValueError(
            f"{root} exists but is not a busiseg phantom with seed={params['seed']}, "
            f"n_per_class={params['n_per_class']}, sizes {params['min_size']}-{params['max_size']}; "
            "delete it or choose another data.root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        _write_phantom(tmp, params)
        if root.exists():
            root.rmdir()  # empty: renaming onto a directory is not portable
        os.rename(tmp, root)
    except OSError:
        # A concurrent run may have put the same phantom in place first.
        if _read_marker(root) != params:
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: python -m busiseg.data.synthetic ROOT [--seed 0] [--benign N --malignant N --normal N]."""
    parser = argparse.ArgumentParser(
        prog="python -m busiseg.data.synthetic",
        description="Write (or reuse) the synthetic breast-ultrasound phantom in the BUSI layout.",
    )
    parser.add_argument("root", type=Path, help="output folder; reused if it holds the same phantom")
    parser.add_argument("--seed", type=int, default=0)
    for name in CLASS_NAMES:
        parser.add_argument(f"--{name}", type=int, default=DEFAULT_N_PER_CLASS[name], metavar="N")
    parser.add_argument("--min-size", type=int, default=160)
    parser.add_argument("--max-size", type=int, default=256)
    args = parser.parse_args(argv)
    counts = {name: getattr(args, name) for name in CLASS_NAMES}
    try:
        root = ensure_phantom(args.root, counts, args.seed, args.min_size, args.max_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = " ".join(f"{name}={counts[name]}" for name in CLASS_NAMES)
    print(f"phantom ready at {root}: {summary} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

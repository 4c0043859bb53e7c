"""Dataset audit: ``python -m busiseg.audit data.root=/path/to/Dataset_BUSI_with_GT``.

Reads every image and mask once and reports, in ``audit.json`` and a readable ``audit.md``
(with a picture of every duplicate group) in the run dir: images per class, images with several
masks, mask and image formats, image sizes, colour overlays, lesion images with empty masks and
normal images with lesion pixels, exact copies, near-duplicate groups, and groups whose members
are filed under different classes (label conflicts). See docs/data.md for what it finds on BUSI.

The result is cached per dataset (key: file names, sizes and mtimes plus the detector settings;
never inside the dataset folder, which may be read-only), so that the splitters
(``busiseg.data.splits``) get the duplicate groups without recomputing them each run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from busiseg.atomic import write_json_atomic
from busiseg.cli import entry_point, fail
from busiseg.data.busi import (DatasetError, Record, _open, image_to_array, mask_size_problem, mask_to_bool,
                               scan_busi, summarize)
from busiseg.data.duplicates import DuplicateParams, PairMatch, dhash, find_duplicates, fingerprint, to_grey
from busiseg.data.labels import CLASS_NAMES

log = logging.getLogger("busiseg.audit")

CONFIG_DIR = os.environ.get("BUSISEG_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))

# Bump when the audit's content or the detector changes, so old caches are not reused.
AUDIT_VERSION = 2  # 2: 16-bit and float scans read as training reads them (1 clipped them to white)
# A pixel is coloured when its RGB channels differ by more than this (grey = all equal) ...
COLOUR_SPREAD = 30
# ... and an image has a colour overlay (Doppler, calipers, boxes) from this many such pixels.
COLOUR_MIN_PIXELS = 20
# The plain perceptual hash the report compares with: 64-bit dHash, at most this many bits apart.
DHASH_MAX_DISTANCE = 4


def duplicate_params(params: DuplicateParams | Mapping[str, Any] | None) -> DuplicateParams:
    """DuplicateParams from a config mapping (``split.duplicates`` / ``duplicates``), or the defaults."""
    if isinstance(params, DuplicateParams):
        return params
    values = dict(params or {})
    unknown = set(values) - set(DuplicateParams.__dataclass_fields__)
    if unknown:
        known = ", ".join(DuplicateParams.__dataclass_fields__)
        raise ValueError(f"unknown duplicates setting(s) {sorted(unknown)}; known: {known}")
    return DuplicateParams(**values)


# --------------------------------------------------------------------------- one image


def _inspect(record: Record, params: DuplicateParams) -> dict[str, Any]:
    """Everything the audit needs from one image and its masks (pixels are not kept)."""
    out: dict[str, Any] = {"name": record.name, "label": record.class_name, "problems": []}
    image = _open(record.image)
    out["mode"] = image.mode
    out["size"] = [image.width, image.height]
    rgb = image_to_array(image, 3)  # as training reads it: 16-bit and float scans stretched, not clipped to white
    channels = rgb.astype(np.int16)
    spread = channels.max(axis=2) - channels.min(axis=2)
    out["coloured_pixels"] = int((spread > COLOUR_SPREAD).sum())
    grey = to_grey(rgb)
    out["fingerprint"] = fingerprint(rgb, params)
    out["dhash"] = dhash(grey)

    out["mask_modes"] = []
    lesion = np.zeros(grey.shape, dtype=bool)
    for path in record.masks:
        try:
            mask = _open(path)
        except DatasetError as exc:
            out["problems"].append(str(exc))
            continue
        out["mask_modes"].append(mask.mode)
        if mask.size != image.size:
            out["problems"].append(mask_size_problem(path, mask.size, image.size))
            continue
        lesion |= mask_to_bool(mask)
    out["lesion_pixels"] = int(lesion.sum())
    return out


# --------------------------------------------------------------------------- the audit


def _progress(description: str, enabled: bool):
    """A ``wrap(iterable, total)`` showing a transient progress bar, or None."""
    if not enabled:
        return None
    from rich.progress import track

    def wrap(iterable: Iterable, total: int) -> Iterable:
        return track(iterable, total=total, description=description, transient=True) if total >= 50 else iterable

    return wrap


def audit_records(
    records: Sequence[Record],
    params: DuplicateParams | Mapping[str, Any] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Audit these records; returns a JSON-ready dict (see ``docs/data.md`` for the fields)."""
    params = duplicate_params(params)
    started = time.perf_counter()
    workers = workers or min(4, os.cpu_count() or 1)

    problems: list[str] = []

    def inspect(record: Record) -> dict[str, Any] | None:
        try:
            return _inspect(record, params)
        except DatasetError as exc:
            problems.append(str(exc))
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results: Iterable = pool.map(inspect, records)
        wrap = _progress(f"Auditing {len(records)} images", progress)
        infos_all = list(wrap(results, len(records)) if wrap else results)
    infos = [i for i in infos_all if i is not None]
    for info in infos:
        problems.extend(info["problems"])
    read_seconds = time.perf_counter() - started

    fingerprints = [info.pop("fingerprint") for info in infos]
    names = [info["name"] for info in infos]
    labels = [info["label"] for info in infos]
    wrap = _progress("Comparing candidate pairs", progress)
    found = find_duplicates(fingerprints, params, workers=workers, progress=wrap)

    def link(m: PairMatch) -> list[Any]:
        return [names[m.i], names[m.j], m.score, m.coarse, m.scale, m.kind]

    groups = []
    for members in found.groups:
        classes = Counter(labels[k] for k in members)
        member_set = set(members)
        groups.append(
            {
                "members": [names[k] for k in members],
                "classes": {c: classes[c] for c in CLASS_NAMES if classes[c]},
                "conflict": len(classes) > 1,
                "links": [link(m) for m in found.pairs if m.i in member_set],
            }
        )
    for k, g in enumerate(groups, 1):
        g["id"] = k

    sizes = Counter(tuple(i["size"]) for i in infos)
    widths = sorted(s[0] for s in (i["size"] for i in infos))
    heights = sorted(s[1] for s in (i["size"] for i in infos))
    colour = sorted(
        ({"image": i["name"], "coloured_pixels": i["coloured_pixels"]} for i in infos
         if i["coloured_pixels"] >= COLOUR_MIN_PIXELS),
        key=lambda d: -d["coloured_pixels"],
    )
    counts = summarize(list(records))
    result: dict[str, Any] = {
        "version": AUDIT_VERSION,
        "key": cache_key(records, params),
        "params": params.as_dict(),
        "images": len(records),
        "counts": counts,
        "unreadable_or_bad": problems,
        "images_with_several_masks": [
            {"image": r.name, "masks": len(r.masks)} for r in records if len(r.masks) > 1
        ],
        "image_modes": dict(Counter(i["mode"] for i in infos).most_common()),
        "mask_modes": dict(Counter(m for i in infos for m in i["mask_modes"]).most_common()),
        "image_sizes": {
            "distinct": len(sizes),
            "width": {"min": widths[0], "median": widths[len(widths) // 2], "max": widths[-1]} if widths else {},
            "height": {"min": heights[0], "median": heights[len(heights) // 2], "max": heights[-1]} if heights else {},
            "most_common": [[w, h, n] for (w, h), n in sizes.most_common(5)],
        },
        "colour_overlays": colour,
        "lesion_images_with_empty_masks": sorted(
            i["name"] for i in infos if i["label"] != "normal" and i["lesion_pixels"] == 0
        ),
        "normal_images_with_lesion_pixels": sorted(
            i["name"] for i in infos if i["label"] == "normal" and i["lesion_pixels"] > 0
        ),
        "exact_duplicates": [[names[k] for k in g] for g in found.exact_groups],
        "near_duplicate_groups": groups,
        "label_conflicts": [
            {"group": g["id"], "members": {c: [m for m in g["members"] if m.split("/")[0] == c] for c in g["classes"]}}
            for g in groups
            if g["conflict"]
        ],
        "review_pairs": [link(m) for m in found.review],
        "plain_hash_comparison": _plain_hash_comparison(infos, groups, found.exact_groups),
        "detector": {
            "candidate_pairs": found.candidates,
            "score_histogram": _histogram(found.scores),
        },
        "seconds": {"read": round(read_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }
    return result


def _histogram(scores: list[float]) -> dict[str, int]:
    edges = [-1.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0001]
    counts, _ = np.histogram(np.asarray(scores, dtype=float), bins=edges)
    labels = [f"<{edges[1]}"] + [f"{a}-{b}" for a, b in zip(edges[1:-2], edges[2:-1])] + [f">={edges[-2]}"]
    return dict(zip(labels, (int(c) for c in counts)))


def _plain_hash_comparison(infos: list[dict], groups: list[dict], exact: list[list[int]]) -> dict[str, Any]:
    """How many duplicate pairs a content hash and a 64-bit dHash would have found."""
    index = {info["name"]: k for k, info in enumerate(infos)}
    pairs = {
        (min(index[a], index[b]), max(index[a], index[b]))
        for g in groups
        for a, b in itertools.combinations(g["members"], 2)
    }
    exact_pairs = {(a, b) for g in exact for a, b in itertools.combinations(sorted(g), 2)}
    n = len(infos)
    out: dict[str, Any] = {
        "duplicate_pairs": len(pairs),
        "found_by_content_hash": len(pairs & exact_pairs),
        "dhash_max_distance": DHASH_MAX_DISTANCE,
    }
    if n > 20000:  # all pairs of 64-bit hashes: cheap, but not free
        out["dhash"] = "skipped (more than 20000 images)"
        return out
    hashes = np.array([info["dhash"] for info in infos], dtype=np.uint64)
    close: set[tuple[int, int]] = set()
    for i in range(n - 1):
        x = np.bitwise_xor(hashes[i + 1 :], hashes[i])
        distance = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        close.update((i, i + 1 + int(j)) for j in np.flatnonzero(distance <= DHASH_MAX_DISTANCE))
    out["found_by_dhash"] = len(pairs & close)
    out["missed_by_dhash"] = len(pairs - close)
    out["dhash_pairs_not_grouped"] = [
        [infos[i]["name"], infos[j]["name"]] for i, j in sorted(close - pairs)
    ]
    return out


# --------------------------------------------------------------------------- cache


def cache_key(records: Sequence[Record], params: DuplicateParams | Mapping[str, Any] | None = None) -> str:
    """Hash of every file's name, size and mtime plus the detector settings and audit version."""
    params = duplicate_params(params)
    files = []
    for r in records:
        for path in (r.image, *r.masks):
            try:
                st = path.stat()
            except OSError as exc:
                raise DatasetError(f"{path}: cannot stat ({exc})") from exc
            files.append([f"{path.parent.name}/{path.name}", st.st_size, st.st_mtime_ns])
    payload = json.dumps({"version": AUDIT_VERSION, "params": params.as_dict(), "files": sorted(files)})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cache_file(cache_dir: str | Path | None, key: str) -> Path | None:
    """Where the audit of ``key`` (:func:`cache_key`) is cached; None without a cache folder."""
    return Path(cache_dir).expanduser() / f"audit-{key}.json" if cache_dir else None


def load_or_audit(
    records: Sequence[Record],
    params: DuplicateParams | Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The audit of these records from ``cache_dir/<key>.json`` if there, else computed and saved there."""
    params = duplicate_params(params)
    key = cache_key(records, params)
    path = cache_file(cache_dir, key)
    if path is not None and path.is_file():
        try:
            result = json.loads(path.read_text())
            if result.get("key") == key:
                log.info("audit: reusing %s", path)
                return result
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("audit: ignoring unreadable cache file %s (%s)", path, exc)
    log.info("audit: checking %d images for duplicates (cached afterwards)", len(records))
    result = audit_records(records, params, workers=workers, progress=progress)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, result, indent=1)
        except OSError as exc:
            log.warning("audit: cannot write the cache %s (%s); it will be recomputed next time", path, exc)
    return result


def duplicate_groups(audit: Mapping[str, Any]) -> list[list[str]]:
    """The audit's duplicate groups as lists of record names."""
    return [list(g["members"]) for g in audit["near_duplicate_groups"]]


# --------------------------------------------------------------------------- report


def group_montage(paths: Sequence[Path], captions: Sequence[str], height: int = 96) -> Image.Image:
    """One row of downscaled images with captions (a figure, not a copy of the data)."""
    tiles = []
    for path, caption in zip(paths, captions):
        with Image.open(path) as im:
            im = Image.fromarray(image_to_array(im, 3))  # a 16-bit scan shown as training reads it, not white
            width = max(1, round(im.width * height / im.height))
            tile = im.resize((width, height), Image.BILINEAR)
        band = Image.new("RGB", (width, 14), (0, 0, 0))
        ImageDraw.Draw(band).text((2, 1), caption, fill=(255, 255, 0))
        framed = Image.new("RGB", (width, height + 14))
        framed.paste(band, (0, 0))
        framed.paste(tile, (0, 14))
        tiles.append(framed)
    gap = 4
    out = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height + 14), (40, 40, 40))
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    return out


def _caption(name: str) -> str:
    cls, file = name.split("/", 1)
    number = file.rsplit("(", 1)[-1].split(")", 1)[0]
    return f"{cls} {number}"


def write_report(audit: Mapping[str, Any], out_dir: str | Path, root: str | Path | None = None,
                 thumbnails: bool = True) -> tuple[Path, Path]:
    """Write ``audit.json`` and ``audit.md`` (+ ``groups/group_NNN.png`` when thumbnails and root)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "audit.json"
    json_path.write_text(json.dumps(audit, indent=1) + "\n")
    pictures: dict[int, str] = {}
    if thumbnails and root is not None:
        (out_dir / "groups").mkdir(exist_ok=True)
        for g in audit["near_duplicate_groups"]:
            rel = f"groups/group_{g['id']:03d}.png"
            paths = [Path(root) / m for m in g["members"]]
            group_montage(paths, [_caption(m) for m in g["members"]]).save(out_dir / rel, optimize=True)
            pictures[g["id"]] = rel
    md_path = out_dir / "audit.md"
    md_path.write_text(render_markdown(audit, pictures))
    return json_path, md_path


def _short(name: str) -> str:
    return name.split("/", 1)[1].removesuffix(".png")


def render_markdown(audit: Mapping[str, Any], pictures: Mapping[int, str] | None = None) -> str:
    pictures = pictures or {}
    a = audit
    lines = [f"# Dataset audit: {a.get('root', '')}", ""]
    counts = a["counts"]
    lines += [f"{a['images']} images: " + ", ".join(f"{c} {counts[c]}" for c in CLASS_NAMES) + ".", ""]
    p = a["params"]
    lines += [
        f"Detector: speckle score >= {p['threshold']} joins two images (one scan); "
        f"{p['review_threshold']} <= score < {p['threshold']} joins them as neighbouring frames when the coarse "
        f"correlation is >= {p['frame_coarse']}, else lists them for review. "
        f"{a['detector']['candidate_pairs']} candidate pairs checked; {a['seconds']['total']} s"
        + (f" when first computed (this report read the cache {a['cached']})." if a.get("cached") else "."),
        "",
        "## Summary",
        "",
        "| check | count |",
        "|---|---|",
        f"| exact duplicates (same pixels), groups | {len(a['exact_duplicates'])} |",
        f"| near-duplicate groups | {len(a['near_duplicate_groups'])} |",
        f"| images in near-duplicate groups | {sum(len(g['members']) for g in a['near_duplicate_groups'])} |",
        f"| label conflicts (groups under 2+ classes) | {len(a['label_conflicts'])} |",
        f"| pairs for review (not grouped) | {len(a['review_pairs'])} |",
        f"| images with several masks | {len(a['images_with_several_masks'])} |",
        f"| images with colour overlays | {len(a['colour_overlays'])} |",
        f"| lesion images with empty masks | {len(a['lesion_images_with_empty_masks'])} |",
        f"| normal images with lesion pixels | {len(a['normal_images_with_lesion_pixels'])} |",
        f"| unreadable or inconsistent files | {len(a['unreadable_or_bad'])} |",
        "",
    ]
    ph = a["plain_hash_comparison"]
    lines += [
        "## What a plain hash would find",
        "",
        f"The groups hold {ph['duplicate_pairs']} pairs of images. A content hash finds "
        f"{ph['found_by_content_hash']} of them"
        + (
            f"; a 64-bit dHash (<= {ph['dhash_max_distance']} bits apart) finds {ph['found_by_dhash']} and "
            f"misses {ph['missed_by_dhash']}; it also pairs {len(ph['dhash_pairs_not_grouped'])} images the "
            "detector did not group."
            if "found_by_dhash" in ph
            else "."
        ),
        "",
    ]
    lines += ["## Label conflicts", ""]
    if not a["label_conflicts"]:
        lines += ["None.", ""]
    for c in a["label_conflicts"]:
        parts = "; ".join(f"{cls}: {', '.join(_short(m) for m in ms)}" for cls, ms in c["members"].items())
        lines.append(f"- group {c['group']}: {parts}")
    lines.append("")
    lines += ["## Formats", ""]
    lines.append("Image modes: " + ", ".join(f"{k} {v}" for k, v in a["image_modes"].items()) + ".  ")
    lines.append("Mask modes: " + ", ".join(f"{k} {v}" for k, v in a["mask_modes"].items()) + ".  ")
    s = a["image_sizes"]
    if s.get("width"):
        lines.append(
            f"Sizes: {s['distinct']} distinct; width {s['width']['min']}-{s['width']['max']} "
            f"(median {s['width']['median']}), height {s['height']['min']}-{s['height']['max']} "
            f"(median {s['height']['median']})."
        )
    lines.append("")
    for title, items in (
        ("Images with several masks", [f"{_short(d['image'])} ({d['masks']})" for d in a["images_with_several_masks"]]),
        ("Colour overlays (coloured pixels)",
         [f"{_short(d['image'])} ({d['coloured_pixels']})" for d in a["colour_overlays"]]),
        ("Lesion images with empty masks", [_short(n) for n in a["lesion_images_with_empty_masks"]]),
        ("Normal images with lesion pixels", [_short(n) for n in a["normal_images_with_lesion_pixels"]]),
        ("Unreadable or inconsistent files", list(a["unreadable_or_bad"])),
    ):
        lines += [f"## {title}", "", (", ".join(items) if items else "None."), ""]
    lines += ["## Near-duplicate groups", ""]
    if not a["near_duplicate_groups"]:
        lines += ["None.", ""]
    for g in a["near_duplicate_groups"]:
        flag = " **label conflict**" if g["conflict"] else ""
        lines.append(f"### Group {g['id']}{flag}: {', '.join(g['members'])}")
        lines.append("")
        links = "; ".join(f"{_short(x)}~{_short(y)} {kind} {score:.2f}" for x, y, score, _, _, kind in g["links"])
        lines.append(f"Links: {links}")
        lines.append("")
        if g["id"] in pictures:
            lines += [f"![group {g['id']}]({pictures[g['id']]})", ""]
    lines += ["## Pairs for review (not grouped)", ""]
    if not a["review_pairs"]:
        lines.append("None.")
    for x, y, score, coarse, scale, _ in a["review_pairs"]:
        lines.append(f"- {x} ~ {y}: speckle {score:.2f}, coarse {coarse:.2f}, scale {scale:.2f}")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def run(cfg: DictConfig) -> dict[str, Any]:
    """The audit CLI's work, from a composed config (conf/audit.yaml)."""
    data = cfg.data
    root = data.get("root")
    if root in (None, "", "???"):
        raise DatasetError("data.root is not set: pass data.root=/path/to/Dataset_BUSI_with_GT (or data=synthetic)")
    if data.get("synthetic"):
        from busiseg.data.synthetic import ensure_phantom

        ensure_phantom(root, **dict(data.synthetic))
    records = scan_busi(root)
    params = dict(cfg.get("duplicates") or {})
    cache = cache_file(cfg.get("cache_dir"), cache_key(records, params))
    was_cached = cache is not None and cache.is_file()
    audit = dict(load_or_audit(records, params, cfg.get("cache_dir"), workers=cfg.get("workers")))
    if was_cached:
        audit["cached"] = str(cache)  # the report says its seconds are the first run's
    audit["root"] = str(Path(root).expanduser().resolve())
    out_dir = Path(cfg.paths.output_dir)
    json_path, md_path = write_report(audit, out_dir, root, thumbnails=bool(cfg.get("thumbnails", True)))
    conflicts = audit["label_conflicts"]
    log.info(
        "%d images; %d exact-duplicate set(s); %d near-duplicate group(s) holding %d images; %d label conflict(s)",
        audit["images"], len(audit["exact_duplicates"]), len(audit["near_duplicate_groups"]),
        sum(len(g["members"]) for g in audit["near_duplicate_groups"]), len(conflicts),
    )
    for c in conflicts:
        log.info("  label conflict: %s", "; ".join(f"{k}: {', '.join(v)}" for k, v in c["members"].items()))
    bad = list(audit.get("unreadable_or_bad") or [])
    if bad:  # training stops on these: say so here, not only in audit.md
        log.warning("%d unreadable or inconsistent file(s), which training refuses: %s", len(bad),
                    "; ".join(str(b) for b in bad[:5]) + (f"; ... ({len(bad) - 5} more in the report)" if len(bad) > 5
                                                         else ""))
    log.info("report: %s and %s", md_path, json_path)
    return audit


@entry_point("busiseg", CONFIG_DIR, "audit")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (DatasetError, ValueError) as exc:
        fail(log, exc, 2)


if __name__ == "__main__":
    main()

"""Near-duplicate detection on a phantom with planted copies: a crop, a rescale, an annotated
copy, a cross-class copy and a crop + rescale + calipers combination."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from busiseg.audit import audit_records, cache_key, duplicate_groups, duplicate_params, load_or_audit
from busiseg.data.busi import scan_busi
from busiseg.data.duplicates import DuplicateParams, connected_components, fingerprint, match_pair, shortlist
from busiseg.data.synthetic import generate_phantom

# (how the copy is made, class of the source, which image of that class, class the copy is filed under)
PLANS = [
    ("crop", "benign", 0, "benign"),  # off-centre crop, 70 % x 75 %
    ("rescale", "malignant", 1, "malignant"),  # whole image rescaled to 0.7
    ("annotate", "normal", 2, "normal"),  # calipers, dotted line and text burned in
    ("exact", "benign", 3, "malignant"),  # the same pixels under another class
    ("combo", "benign", 4, "benign"),  # crop 85 % + rescale 1.25 + calipers
]


def _annotate(im: Image.Image) -> Image.Image:
    """Burn in ultrasound-style annotations: two yellow calipers, a dotted line, a label."""
    im = im.convert("RGB")
    d = ImageDraw.Draw(im)
    w, h = im.size
    (x0, y0), (x1, y1) = (int(w * 0.3), int(h * 0.45)), (int(w * 0.65), int(h * 0.55))
    for x, y in ((x0, y0), (x1, y1)):
        d.line([(x - 6, y), (x + 6, y)], fill=(255, 255, 0), width=2)
        d.line([(x, y - 6), (x, y + 6)], fill=(255, 255, 0), width=2)
    for t in np.linspace(0, 1, 25):
        x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        d.point((int(x), int(y)), fill=(255, 255, 0))
    d.text((int(w * 0.05), int(h * 0.85)), "RT BREAST 1.2cm", fill=(255, 255, 255))
    return im


def _plant(root: Path, how: str, name: str, source: str) -> None:
    image = Image.open(root / source)
    image.load()
    masks = sorted((root / source).parent.glob(Path(source).stem + "_mask*.png"))
    mask_images = [Image.open(m).convert("L") for m in masks]
    w, h = image.size

    def apply(fn):
        return fn(image), [fn(m) for m in mask_images]

    if how == "crop":
        box = (int(0.05 * w), int(0.2 * h), int(0.75 * w), int(0.95 * h))
        image, mask_images = apply(lambda im: im.crop(box))
    elif how == "rescale":
        size = (round(0.7 * w), round(0.7 * h))
        image, mask_images = apply(lambda im: im.resize(size, Image.BILINEAR))
    elif how == "annotate":
        image = _annotate(image)
    elif how == "combo":
        box = (int(0.1 * w), int(0.05 * h), int(0.95 * w), int(0.9 * h))
        size = (round(0.85 * w * 1.25), round(0.85 * h * 1.25))
        image, mask_images = apply(lambda im: im.crop(box).resize(size, Image.BILINEAR))
        image = _annotate(image)
    target = root / name
    image.save(target)
    for k, m in enumerate(mask_images):
        suffix = "_mask" if k == 0 else f"_mask_{k}"
        m.save(target.with_name(target.stem + suffix + ".png"))


def write_planted_dataset(root: Path) -> dict[str, str]:
    """A 24-image phantom (distinct images) plus copies made by PLANS, in the BUSI layout.

    Returns {copy name: source name}; the copies are numbered 101, 102, ...
    """
    generate_phantom(root, {"benign": 8, "malignant": 8, "normal": 8}, seed=3, min_size=160, max_size=224)
    by_class: dict[str, list[str]] = {}
    for r in scan_busi(root):
        by_class.setdefault(r.class_name, []).append(r.name)
    planted = {}
    for k, (how, cls, which, copy_cls) in enumerate(PLANS, 101):
        source, name = by_class[cls][which], f"{copy_cls}/{copy_cls} ({k}).png"
        _plant(root, how, name, source)
        planted[name] = source
    return planted


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("planted") / "busi"
    return root, write_planted_dataset(root)


@pytest.fixture(scope="module")
def planted_audit(planted) -> dict:
    return audit_records(scan_busi(planted[0]), progress=False)


def test_each_planted_copy_is_found_and_nothing_else(planted, planted_audit):
    groups = {frozenset(g) for g in duplicate_groups(planted_audit)}
    expected = {frozenset({copy, source}) for copy, source in planted[1].items()}
    assert groups == expected, planted_audit["near_duplicate_groups"]
    for g in planted_audit["near_duplicate_groups"]:
        for _, _, score, *_ in g["links"]:
            assert score >= 0.5  # clear of the threshold, not scraping past it


def test_exact_copy_and_label_conflict_reported(planted, planted_audit):
    source = planted[1]["malignant/malignant (104).png"]
    assert planted_audit["exact_duplicates"] == [[source, "malignant/malignant (104).png"]]
    conflicts = planted_audit["label_conflicts"]
    assert len(conflicts) == 1
    assert conflicts[0]["members"] == {"benign": [source], "malignant": ["malignant/malignant (104).png"]}
    comparison = planted_audit["plain_hash_comparison"]
    assert comparison["duplicate_pairs"] == 5 and comparison["found_by_content_hash"] == 1


def test_audit_counts_and_overlays(planted_audit):
    assert planted_audit["counts"] == {"normal": 9, "benign": 10, "malignant": 10}
    overlays = {d["image"] for d in planted_audit["colour_overlays"]}
    assert overlays == {"normal/normal (103).png", "benign/benign (105).png"}  # the annotated copies
    assert not planted_audit["lesion_images_with_empty_masks"]
    assert not planted_audit["normal_images_with_lesion_pixels"]
    assert planted_audit["review_pairs"] == []


def test_distinct_phantoms_score_near_zero(planted):
    params = DuplicateParams()
    records = [r for r in scan_busi(planted[0]) if r.name not in planted[1]]
    fps = [fingerprint(np.asarray(Image.open(r.image).convert("RGB")), params) for r in records]
    scores = [match_pair(fps[i], fps[j], params).score for i, j in shortlist(np.stack([f.views for f in fps]), 5)]
    assert scores and max(scores) < params.review_threshold


def test_cache_reused_then_invalidated_and_dataset_untouched(tmp_path, monkeypatch):
    import busiseg.audit as audit

    root = tmp_path / "busi"
    generate_phantom(root, {"benign": 3, "malignant": 3, "normal": 3}, seed=1, min_size=64, max_size=96)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    records = scan_busi(root)
    cache = tmp_path / "cache"
    first = load_or_audit(records, {"threshold": 0.3}, cache, progress=False)
    assert len(list(cache.glob("audit-*.json"))) == 1
    calls = []
    monkeypatch.setattr(audit, "audit_records", lambda *a, **k: calls.append(1) or first)
    assert load_or_audit(records, {"threshold": 0.3}, cache, progress=False) == first
    assert not calls  # served from the cache
    load_or_audit(records, {"threshold": 0.35}, cache, progress=False)
    assert len(calls) == 1  # other detector settings: another key
    os.utime(records[0].image, ns=(1, 1))
    assert cache_key(records, {"threshold": 0.3}) != first["key"]  # a file's mtime changed
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written into the dataset


def test_params_validated_naming_the_key():
    with pytest.raises(ValueError, match="duplicates.threshold"):
        DuplicateParams(threshold=1.5)
    with pytest.raises(ValueError, match="unknown duplicates setting"):
        duplicate_params({"treshold": 0.3})
    assert duplicate_params({"views": [1.0, 0.8]}).views == (1.0, 0.8)


def test_connected_components():
    assert connected_components(6, [(0, 2), (2, 4), (1, 5)]) == [[0, 2, 4], [1, 5]]
    assert connected_components(3, []) == []


def test_a_16_bit_scan_is_audited_as_training_reads_it(tmp_path):
    """A scan saved at 16 bits is the same picture: it must not be clipped to white and then matched with
    unrelated scans (a false label conflict would drop them from training)."""
    root = tmp_path / "busi"
    generate_phantom(root, {"benign": 6, "malignant": 6, "normal": 6}, seed=5, min_size=160, max_size=224)
    records = scan_busi(root)
    eight_bit = audit_records(records, progress=False)
    target = next(r for r in records if r.class_name == "benign")
    grey = np.asarray(Image.open(target.image).convert("L"), dtype=np.uint16)
    Image.fromarray(grey * 257).save(target.image)  # the same scan, 0..65535
    assert Image.open(target.image).mode.startswith("I")
    sixteen_bit = audit_records(scan_busi(root), progress=False)
    assert duplicate_groups(sixteen_bit) == duplicate_groups(eight_bit)
    assert sixteen_bit["label_conflicts"] == eight_bit["label_conflicts"] == []


def test_the_copies_check_finds_a_16_bit_copy_of_a_training_scan(tmp_path):
    """eval's copies check: a training scan saved again at 16 bits elsewhere is still its copy (it was read
    clipped to white, and so missed)."""
    from busiseg.evaluation.copies import copies_of_training

    train_root, held_root = tmp_path / "train", tmp_path / "held"
    generate_phantom(train_root, {"benign": 4, "malignant": 4, "normal": 4}, seed=6, min_size=160, max_size=224)
    trained = scan_busi(train_root)
    source = trained[0]
    target = held_root / source.class_name / Path(source.image).name
    for name in ("benign", "malignant", "normal"):
        (held_root / name).mkdir(parents=True, exist_ok=True)
    grey = np.asarray(Image.open(source.image).convert("L"), dtype=np.uint16)
    Image.fromarray(grey * 257).save(target)
    for mask in source.masks:
        Image.open(mask).save(target.parent / Path(mask).name)
    with pytest.warns(UserWarning, match="hold no images"):
        held = scan_busi(held_root)
    assert Image.open(held[0].image).mode.startswith("I")
    found = copies_of_training(held, trained, DuplicateParams(), workers=1)
    assert found == [{"image": source.name, "training_images": [source.name]}]

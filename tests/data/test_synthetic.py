"""The synthetic phantom: BUSI layout, determinism, pixel sanity, reuse and the CLI."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busiseg.data import synthetic
from busiseg.data.labels import CLASS_NAMES
from busiseg.data.synthetic import PHANTOM_MARKER, ensure_phantom, generate_phantom, main

SMALL = {"benign": 4, "malignant": 4, "normal": 4}
SIZES = {"min_size": 64, "max_size": 96}
NAME = re.compile(r"^(benign|malignant|normal) \(\d+\)(_mask(_\d+)?)?\.png$")


def _images(root: Path, kind: str) -> list[Path]:
    return sorted(p for p in (root / kind).glob("*.png") if "_mask" not in p.name)


def _masks(image: Path) -> list[Path]:
    return sorted(image.parent.glob(f"{image.stem}_mask*.png"))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def _lesion(image: Path) -> np.ndarray:
    """Union of all masks of one image, as bool."""
    return np.logical_or.reduce([_grey(m) > 0 for m in _masks(image)])


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("ph") / "busi", SMALL, seed=0, **SIZES)


def test_layout_matches_busi(phantom):
    assert sorted(p.name for p in phantom.iterdir()) == sorted([PHANTOM_MARKER, *CLASS_NAMES])
    for kind in CLASS_NAMES:
        files = list((phantom / kind).iterdir())
        assert all(NAME.match(p.name) and p.name.startswith(kind) for p in files), files
        images = _images(phantom, kind)
        assert len(images) == SMALL[kind]
        for image in images:
            assert (image.parent / f"{image.stem}_mask.png").exists()
            with Image.open(image) as im:
                assert im.mode in ("RGB", "L")
                assert SIZES["min_size"] <= min(im.size) <= max(im.size) <= SIZES["max_size"]
                for mask in _masks(image):
                    with Image.open(mask) as m:
                        assert m.size == im.size
                        assert m.mode in (("RGB",) if kind == "normal" else ("1", "L"))
    # The multi-mask union path is exercised even in a small phantom.
    for kind in ("benign", "malignant"):
        assert list((phantom / kind).glob("*_mask_1.png")), kind


def test_marker_holds_params(phantom):
    marker = json.loads((phantom / PHANTOM_MARKER).read_text())
    assert marker["seed"] == 0 and marker["n_per_class"] == SMALL
    assert marker["version"] == synthetic.PHANTOM_VERSION


def test_masks_and_lesion_contrast(phantom):
    for image in _images(phantom, "normal"):
        assert not _pixels(_masks(image)[0]).any()
    for kind in ("benign", "malignant"):
        for image in _images(phantom, kind):
            for mask in _masks(image):
                values = set(np.unique(_grey(mask)).tolist())
                assert values == {0, 255}, mask  # non-empty, strictly binary
            grey, lesion = _grey(image).astype(float), _lesion(image)
            assert grey[lesion].mean() < 0.8 * grey[~lesion].mean(), image


def _all_pixels(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): _pixels(p) for p in sorted(root.rglob("*.png"))}


def test_same_seed_same_pixels_other_seed_differs(phantom, tmp_path):
    again = _all_pixels(generate_phantom(tmp_path / "a", SMALL, seed=0, **SIZES))
    first = _all_pixels(phantom)
    assert again.keys() == first.keys()
    assert all(np.array_equal(first[k], again[k]) for k in first)

    other = _all_pixels(generate_phantom(tmp_path / "b", SMALL, seed=1, **SIZES))
    shared = [k for k in first if k in other and "_mask" not in k]
    assert shared and all(
        first[k].shape != other[k].shape or not np.array_equal(first[k], other[k]) for k in shared
    )


def test_images_do_not_depend_on_other_classes(phantom, tmp_path):
    only_benign = generate_phantom(tmp_path / "b", {"benign": 4, "malignant": 0, "normal": 0}, **SIZES)
    for image in _images(phantom, "benign"):
        assert np.array_equal(_pixels(image), _pixels(only_benign / "benign" / image.name))


def test_generate_refuses_non_empty_root(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        generate_phantom(tmp_path, SMALL, **SIZES)


def test_bad_params_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown class"):
        generate_phantom(tmp_path / "p", {"cyst": 3})
    with pytest.raises(ValueError):
        generate_phantom(tmp_path / "p", SMALL, min_size=100, max_size=50)


def test_ensure_reuses_without_rewriting(tmp_path):
    root = ensure_phantom(tmp_path / "busi", SMALL, **SIZES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busi"]  # no temp sibling left
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_phantom(tmp_path / "busi", SMALL, **SIZES) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_ensure_fills_an_empty_dir(tmp_path):
    root = tmp_path / "busi"
    root.mkdir()
    ensure_phantom(root, SMALL, **SIZES)
    assert (root / PHANTOM_MARKER).exists()


def test_ensure_refuses_foreign_or_different_phantom(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=re.escape(str(foreign))) as err:
        ensure_phantom(foreign, SMALL, **SIZES)
    assert "\n" not in str(err.value) and "data.root" in str(err.value)
    assert (foreign / "notes.txt").read_text() == "mine"

    root = ensure_phantom(tmp_path / "busi", SMALL, **SIZES)
    with pytest.raises(ValueError, match=re.escape(str(root))):
        ensure_phantom(root, SMALL, seed=1, **SIZES)


def test_killed_generation_leaves_nothing_trusted(tmp_path, monkeypatch):
    calls = []

    def crash(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_image", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_phantom(tmp_path / "busi", SMALL, **SIZES)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_marker(tmp_path, capsys):
    root = tmp_path / "cli"
    argv = [str(root), "--seed", "3", "--benign", "2", "--malignant", "2", "--normal", "1"]
    argv += ["--min-size", "64", "--max-size", "80"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and str(root) in out
    marker = json.loads((root / PHANTOM_MARKER).read_text())
    assert marker["seed"] == 3 and marker["n_per_class"] == {"normal": 1, "benign": 2, "malignant": 2}
    assert len(_images(root, "benign")) == 2
    assert main([*argv[:2], "4"]) != 0  # same root, other seed: refused

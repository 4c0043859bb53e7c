"""A corpus of broken and unusual files, built here: training refuses with one message listing
every bad file; predict skips and reports each; nothing half-written remains (docs/reliability.md)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busiseg.data.busi import DatasetError
from busiseg.onnx_predictor import find_images
from busiseg.train import train
from tests.conftest import write_case
from tests.test_predict import grey_pattern, read_rows, run_predict, tiny_ckpt  # noqa: F401
from tests.test_train import FAST, compose_train

# FAST without the phantom's size overrides (these runs read a BUSI folder)
LIGHT = [o for o in FAST if not o.startswith("data.synthetic")] + ["split.group_duplicates=false"]


def png_bytes(w: int = 40, h: int = 32, mode: str = "L", seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(grey_pattern(w, h, seed)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(w: int, h: int) -> bytes:
    """A valid PNG signature and IHDR claiming w x h, with a tiny IDAT: cheap to write, huge to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def write_unusual_but_valid(folder: Path) -> dict[str, tuple[int, int]]:
    """Readable images in every awkward encoding and name; name -> (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = grey_pattern(48, 40)
    Image.fromarray(g.astype(np.uint16) * 257).save(folder / "deep 16bit.png")
    Image.fromarray(g).convert("P").save(folder / "palette [p].png")
    Image.fromarray(g).convert("RGBA").save(folder / "rgba (1).png")
    Image.fromarray(g).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(g).convert("1").save(folder / "one-bit.png")
    Image.fromarray(g).save(folder / "ünïcødé 超声 (2).png")
    return {n: (48, 40) for n in ("deep 16bit.png", "palette [p].png", "rgba (1).png", "cmyk.jpg", "one-bit.png",
                                  "ünïcødé 超声 (2).png")}


def write_broken(folder: Path) -> list[str]:
    """Unreadable files with image suffixes; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(png_bytes(200, 200)[:300])
    jpeg = io.BytesIO()
    Image.fromarray(grey_pattern(200, 200)).save(jpeg, format="JPEG")
    (folder / "corrupt.jpg").write_bytes(jpeg.getvalue()[:200] + os.urandom(64))
    (folder / "text.png").write_text("this is not a PNG")
    return ["zero.png", "truncated.png", "corrupt.jpg", "text.png"]


def test_training_refuses_listing_every_bad_file(tmp_path):
    root = tmp_path / "busi"
    for n in (1, 2, 3):
        for cls in ("benign", "malignant", "normal"):
            write_case(root, cls, n)
    bad = {
        "benign/benign (4).png": b"",  # zero bytes
        "benign/benign (5).png": png_bytes(200, 200)[:300],  # truncated
        "malignant/malignant (4).png": b"not a png at all",  # text named .png
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
        (root / name.replace(".png", "_mask.png")).write_bytes(png_bytes(40, 32))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "normal" / "normal (1)_mask.png")  # size mismatch
    (root / "benign" / "benign (6).png").write_bytes(png_bytes())  # image without mask
    (root / "malignant" / "malignant (9)_mask.png").write_bytes(png_bytes())  # mask without image
    cfg = compose_train(tmp_path, tmp_path, ["data=busi", f"data.root={root}", "debug=fdr"] + LIGHT, fast=False)
    # one error, before training, lists the layout problems with every unreadable file and size mismatch
    with pytest.raises(DatasetError) as info:
        train(cfg)
    message = str(info.value)
    assert "6 problem(s) in the dataset" in message
    for name in [*bad, "normal/normal (1)_mask.png", "benign/benign (6).png", "malignant/malignant (9)_mask.png"]:
        assert str(root / name) in message, name
    assert not (tmp_path / "run" / "checkpoints").exists()
    # with the layout fixed, decoding lists the rest in one error too
    (root / "benign" / "benign (6).png").unlink()
    (root / "malignant" / "malignant (9)_mask.png").unlink()
    with pytest.raises(DatasetError) as decoding:
        train(cfg)
    message = str(decoding.value)
    for name in [*bad, "normal/normal (1)_mask.png"]:
        assert Path(name).name in message, name
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_refuses_an_empty_class_folder(tmp_path):
    root = tmp_path / "busi"
    for n in (1, 2, 3):
        for cls in ("benign", "malignant"):
            write_case(root, cls, n)
    (root / "normal").mkdir()
    cfg = compose_train(tmp_path, tmp_path, ["data=busi", f"data.root={root}", "debug=fdr"] + LIGHT, fast=False)
    with pytest.raises(DatasetError, match=r"busi/normal/: the class folder holds no images \(training needs"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unusual_encodings_and_names_train(tmp_path):
    root = tmp_path / "busi"
    for cls in ("benign", "malignant", "normal"):
        for n in (1, 2, 3, 4):
            write_case(root, cls, n)
    g = grey_pattern(40, 32)
    for name, im in {"benign/benign [x] (7).png": Image.fromarray(g.astype(np.uint16) * 257),
                     "malignant/malignant ü (8).jpg": Image.fromarray(g).convert("CMYK"),
                     "normal/normal (9).png": Image.fromarray(g).convert("P")}.items():
        im.save(root / name)
        mask = np.zeros((32, 40), np.uint8)
        mask[5:15, 5:15] = 7  # not 0/255: any non-zero value is lesion
        Image.fromarray(mask).save(root / Path(name).with_name(Path(name).stem + "_mask.png"))
    summary = train(compose_train(tmp_path, tmp_path, ["data=busi", f"data.root={root}", "debug=fdr"] + LIGHT, fast=False))
    assert sum(sum(v.values()) for v in summary["images_per_split"].values()) == 15


def test_predict_skips_and_reports_each_bad_file(tiny_ckpt, tmp_path):  # noqa: F811
    src = tmp_path / "in"
    valid = write_unusual_but_valid(src)
    broken = write_broken(src)
    (src / "huge.png").write_bytes(huge_png_header(12_000, 12_000))
    os.symlink(src, src / "loop")  # a symlink loop: not followed
    os.symlink(src / "self.png", src / "self.png")  # a link to itself
    summary = run_predict(tiny_ckpt, src, tmp_path / "out", "overlays=false")
    failed = {Path(p).name: reason for p, reason in summary.failed}
    assert set(failed) == {*broken, "huge.png", "self.png"}
    assert "max_pixels" in failed["huge.png"]
    rows = read_rows(tmp_path / "out")
    assert set(rows) == set(valid)
    for name, (w, h) in valid.items():
        assert (int(rows[name]["width"]), int(rows[name]["height"])) == (w, h)
        assert (tmp_path / "out" / rows[name]["mask"]).is_file()
    assert summary.exit_code == 1
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]  # nothing half-written


def test_huge_image_limit_is_configurable(tiny_ckpt, tmp_path):  # noqa: F811
    (tmp_path / "in").mkdir()
    Image.fromarray(grey_pattern(300, 200)).save(tmp_path / "in" / "big.png")
    refused = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "o1", "max_pixels=50000")
    assert [Path(p).name for p, _ in refused.failed] == ["big.png"]
    allowed = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "o2", "max_pixels=60000")
    assert allowed.exit_code == 0 and len(allowed.rows) == 1


def test_symlink_loop_walk_terminates(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(grey_pattern(20, 20)).save(tmp_path / "a" / "b" / "x.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "up")
    images, _ = find_images(tmp_path)
    assert [i.name.as_posix() for i in images] == ["a/b/x.png"]

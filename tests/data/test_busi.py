from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busiseg.data.busi import DatasetError, load_record, mask_to_bool, root_from_env, scan_busi, summarize
from busiseg.data.dataset import DecodedCache
from busiseg.data.labels import CLASS_NAMES, LABEL_OF
from tests.conftest import write_case


def test_labels_are_fixed():
    assert CLASS_NAMES == ("normal", "benign", "malignant")
    assert LABEL_OF == {"normal": 0, "benign": 1, "malignant": 2}


def test_scan_counts_labels_and_numeric_order(tiny_busi: Path):
    write_case(tiny_busi, "benign", 10)  # sorts after 7, not between 1 and 2
    records = scan_busi(tiny_busi)
    assert summarize(records) == {"normal": 4, "benign": 5, "malignant": 4}
    benign = [r.image.name for r in records if r.class_name == "benign"]
    assert benign == [f"benign ({n}).png" for n in (1, 2, 4, 7, 10)]
    assert {r.label for r in records if r.class_name == "malignant"} == {2}
    assert records[0].name.startswith(records[0].class_name + "/")


def test_multi_mask_union(tmp_path: Path):
    root = tmp_path / "d"
    write_case(root, "benign", 1, masks=((0, 0, 10, 10), (20, 20, 30, 30), (5, 5, 15, 15)))
    for c in ("malignant", "normal"):
        write_case(root, c, 1)
    rec = [r for r in scan_busi(root) if r.class_name == "benign"][0]
    assert [p.name for p in rec.masks] == ["benign (1)_mask.png", "benign (1)_mask_1.png", "benign (1)_mask_2.png"]
    _, mask = load_record(rec)
    expected = np.zeros((32, 40), bool)
    expected[0:10, 0:10] = expected[20:30, 20:30] = expected[5:15, 5:15] = True
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("mode", ["1", "L", "RGB", "RGBA", "P"])
def test_mask_formats(tmp_path: Path, mode: str):
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 4:12] = 255
    im = Image.fromarray(m, "L").convert(mode)
    if mode == "RGBA":
        # like BUSI's RGBA masks: opaque everywhere, lesion only in the colour channels
        assert np.asarray(im)[..., 3].min() == 255
    np.testing.assert_array_equal(mask_to_bool(im), m > 0)


def test_any_nonzero_pixel_is_lesion():
    m = np.zeros((8, 8), np.uint8)
    m[1, 1] = 1
    m[2, 2] = 128
    assert mask_to_bool(Image.fromarray(m, "L")).sum() == 2


def test_rgb_overlay_image_becomes_grey_or_rgb(tmp_path: Path):
    root = tmp_path / "d"
    path = write_case(root, "benign", 1)
    arr = np.asarray(Image.open(path)).copy()
    arr[0:4, 0:4] = (255, 0, 0)  # a colour overlay
    Image.fromarray(arr).save(path)
    for c in ("malignant", "normal"):
        write_case(root, c, 1)
    rec = [r for r in scan_busi(root) if r.class_name == "benign"][0]
    grey, _ = load_record(rec, in_channels=1)
    rgb, _ = load_record(rec, in_channels=3)
    assert grey.shape == (32, 40) and grey.dtype == np.uint8
    assert rgb.shape == (32, 40, 3)
    assert grey[0, 0] == 76  # ITU-R 601 luma of pure red


def test_stray_files_ignored_with_one_counting_warning(tiny_busi: Path):
    (tiny_busi / "benign" / "Thumbs.db").write_bytes(b"x")
    (tiny_busi / "normal" / "notes.txt").write_text("hi")
    (tiny_busi / "normal" / ".DS_Store").write_bytes(b"x")
    with pytest.warns(UserWarning, match=r"ignored 3 file\(s\)"):
        records = scan_busi(tiny_busi)
    assert len(records) == 12


def test_missing_root(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_busi(tmp_path / "nope")


def test_root_from_env_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("BUSI_ROOT", "/some/where")
    assert root_from_env() == "/some/where"
    for unset in (lambda: monkeypatch.delenv("BUSI_ROOT"), lambda: monkeypatch.setenv("BUSI_ROOT", "")):
        unset()
        with pytest.raises(SystemExit) as exit_:
            root_from_env()
        assert exit_.value.code == 2
        assert capsys.readouterr().err == "error: set BUSI_ROOT to the Dataset_BUSI_with_GT folder\n"


def test_a_script_without_busi_root_says_so_in_one_line(tmp_path: Path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "paired_crop_baseline.py"
    env = {k: v for k, v in os.environ.items() if k != "BUSI_ROOT"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "out"), "0"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr == "error: set BUSI_ROOT to the Dataset_BUSI_with_GT folder\n"


def test_missing_class_folder_named(tiny_busi: Path):
    import shutil

    shutil.rmtree(tiny_busi / "normal")
    with pytest.raises(DatasetError, match=r"lacks the class folder\(s\) normal/ \(expected one folder per class: "
                                           r"normal, benign, malignant\)$"):
        scan_busi(tiny_busi)


def test_the_download_folder_given_for_the_dataset_points_at_the_one_inside(tiny_busi: Path):
    # the Kaggle archive unpacks into Dataset_BUSI_with_GT/: a user gives the folder above it
    outer = tiny_busi.parent / "download"
    outer.mkdir()
    (outer / "README.md").write_text("notes")
    inner = tiny_busi.rename(outer / "Dataset_BUSI_with_GT")
    with pytest.raises(DatasetError) as info:
        scan_busi(outer)
    assert str(info.value) == (f"dataset root {outer} lacks the class folder(s) normal/, benign/, malignant/ "
                               f"(expected one folder per class: normal, benign, malignant); "
                               f"Dataset_BUSI_with_GT/ inside it has them: data.root={inner}")


def test_empty_dataset(tmp_path: Path):
    for c in CLASS_NAMES:
        (tmp_path / c).mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        scan_busi(tmp_path)


def test_every_image_without_mask_and_mask_without_image_listed(tiny_busi: Path):
    (tiny_busi / "benign" / "benign (2)_mask.png").unlink()
    (tiny_busi / "normal" / "normal (4)_mask.png").unlink()
    (tiny_busi / "malignant" / "malignant (7).png").unlink()
    with pytest.raises(DatasetError) as info:
        scan_busi(tiny_busi)
    msg = str(info.value)
    assert "3 problem(s)" in msg
    assert "benign (2).png: image without a mask" in msg
    assert "normal (4).png: image without a mask" in msg
    assert "malignant (7)_mask.png: mask without an image" in msg


def test_bad_files_all_reported_before_training(tiny_busi: Path):
    # a mask of the wrong size, a truncated PNG, and a text file named .png
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tiny_busi / "benign" / "benign (1)_mask.png")
    data = (tiny_busi / "malignant" / "malignant (2).png").read_bytes()
    (tiny_busi / "malignant" / "malignant (2).png").write_bytes(data[: len(data) // 2])
    (tiny_busi / "normal" / "normal (7).png").write_text("not a png")
    records = scan_busi(tiny_busi)
    with pytest.raises(DatasetError) as info:
        DecodedCache(records, image_size=32, progress=False)
    msg = str(info.value)
    assert "3 of 12 image(s) cannot be used" in msg
    assert "benign (1)_mask.png: mask size 10x10 differs from its image's 40x32" in msg
    assert "malignant (2).png: cannot read the image" in msg
    assert "normal (7).png: cannot read the image" in msg



def test_scan_names_unreadable_files_with_the_layout_problems(tiny_busi: Path):
    # six bad files at once: one error names every one, not only the images without masks and masks
    # without images (the rest used to show up only on the next run)
    (tiny_busi / "benign" / "benign (1).png").write_bytes(b"")  # zero bytes
    data = (tiny_busi / "malignant" / "malignant (2).png").read_bytes()
    (tiny_busi / "malignant" / "malignant (2).png").write_bytes(data[: len(data) // 2])  # truncated
    (tiny_busi / "normal" / "normal (7).png").write_text("not a png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tiny_busi / "benign" / "benign (2)_mask.png")
    (tiny_busi / "malignant" / "malignant (4)_mask.png").unlink()  # image without a mask
    (tiny_busi / "normal" / "normal (2).png").unlink()  # mask without an image
    with pytest.raises(DatasetError) as info:
        scan_busi(tiny_busi)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{tiny_busi}: 6 problem(s) in the dataset:"
    named = sorted(Path(line.removeprefix("  - ").split(": ")[0]).name for line in lines[1:])
    assert named == ["benign (1).png", "benign (2)_mask.png", "malignant (2).png", "malignant (4).png",
                     "normal (2)_mask.png", "normal (7).png"]
    assert "benign (2)_mask.png: mask size 10x10 differs from its image's 40x32" in str(info.value)


def test_an_empty_class_folder_is_named(tiny_busi: Path):
    for path in (tiny_busi / "normal").iterdir():
        path.unlink()
    # evaluation reads such a folder (the class gets support 0), with a warning naming it ...
    with pytest.warns(UserWarning, match=r"busi: the class folder\(s\) normal/ hold no images"):
        records = scan_busi(tiny_busi)
    assert summarize(records) == {"normal": 0, "benign": 4, "malignant": 4}
    # ... training refuses it (BusiDataModule.setup for fitting), naming the folder
    with pytest.raises(DatasetError, match=r"normal/: the class folder holds no images"):
        scan_busi(tiny_busi, empty_class_ok=False)

def test_cache_resizes_and_keeps_masks_binary(tiny_busi: Path):
    records = scan_busi(tiny_busi)
    cache = DecodedCache(records, image_size=64, progress=False)
    assert cache.images.shape == (12, 64, 64) and cache.images.dtype == np.uint8
    assert cache.masks.dtype == bool
    normal = [i for i, r in enumerate(records) if r.class_name == "normal"]
    assert not cache.masks[normal].any()
    benign0 = [i for i, r in enumerate(records) if r.class_name == "benign"][0]
    # box 12x12 of 40x32 -> area fraction preserved after resizing to 64x64
    assert abs(cache.masks[benign0].mean() - (12 * 12) / (40 * 32)) < 0.02


def test_image_size_must_fit_unet(tiny_busi: Path):
    with pytest.raises(ValueError, match="multiple of 32"):
        DecodedCache(scan_busi(tiny_busi), image_size=100, progress=False)


@pytest.mark.parametrize("mode,values", [("I;16", [0, 1000, 4000]), ("F", [-2.0, 0.0, 2.0]), ("I", [-5, 0, 5])])
def test_wide_images_stretched_without_wrapping(mode, values):
    from busiseg.data.busi import image_to_array

    arr = np.array([values], dtype={"I;16": np.uint16, "F": np.float32, "I": np.int32}[mode])
    out = image_to_array(Image.fromarray(arr, mode) if mode != "I;16" else Image.fromarray(arr))
    assert out.dtype == np.uint8
    assert out[0, 0] == 0 and out[0, -1] == 255
    assert list(out[0]) == sorted(out[0]), "order of intensities kept"

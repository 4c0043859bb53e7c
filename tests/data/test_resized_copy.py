"""The resized copy decodes to the same cache arrays as its source at that size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from busiseg.data.busi import scan_busi
from busiseg.data.dataset import DecodedCache
from busiseg.data.resized_copy import main, write_resized_copy
from tests.conftest import write_case


def test_copy_gives_identical_cache(tiny_busi: Path, tmp_path: Path):
    # a second mask file and an RGBA mask: the copy merges them into one 1-bit mask
    write_case(tiny_busi, "benign", 9, masks=((1, 1, 10, 10), (20, 15, 38, 30)), mask_mode="RGBA")
    dst = tmp_path / "copy"
    assert write_resized_copy(tiny_busi, dst, 64, progress=False) == 13
    src_records, copy_records = scan_busi(tiny_busi), scan_busi(dst)
    assert [r.image.relative_to(tiny_busi) for r in src_records] == [r.image.relative_to(dst) for r in copy_records]
    assert [r.label for r in src_records] == [r.label for r in copy_records]
    a, b = DecodedCache(src_records, 64, progress=False), DecodedCache(copy_records, 64, progress=False)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.masks.any() and not a.masks.all()
    assert (dst / "benign" / "benign (9)_mask.png").exists() and not (dst / "benign" / "benign (9)_mask_1.png").exists()


def test_refuses_a_non_empty_destination_and_bad_sizes(tiny_busi: Path, tmp_path: Path, capsys):
    dst = tmp_path / "copy"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main([str(tiny_busi), str(dst), "--size", "64"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="multiple of 32"):
        write_resized_copy(tiny_busi, tmp_path / "other", 100)
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "x"), "--size", "64"]) == 2

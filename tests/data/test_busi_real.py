"""Reads every file of the real BUSI folder (set BUSI_ROOT; skipped without it)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busiseg.data.busi import load_record, scan_busi, summarize

BUSI_ROOT = os.environ.get("BUSI_ROOT")
pytestmark = [pytest.mark.busi, pytest.mark.skipif(not BUSI_ROOT, reason="BUSI_ROOT not set")]

# the development copy described in ../shared/data/busi/README.md
DEV_COUNTS = {"normal": 106, "benign": 350, "malignant": 167}


@pytest.fixture(scope="module")
def records():
    return scan_busi(BUSI_ROOT)


def test_counts_per_class(records):
    counts = summarize(records)
    root = Path(BUSI_ROOT)
    on_disk = {c: sum(1 for p in (root / c).glob("*.png") if "_mask" not in p.name) for c in counts}
    assert counts == on_disk, "every image on disk is a record"
    if sum(counts.values()) == 623:
        assert counts == DEV_COUNTS
    masks_on_disk = sum(1 for p in root.rglob("*_mask*.png"))
    assert sum(len(r.masks) for r in records) == masks_on_disk, "every mask file belongs to an image"


def test_every_mask_merged_and_binary(records):
    def check(record):
        image, mask = load_record(record)
        assert image.dtype == np.uint8 and image.ndim == 2
        assert mask.dtype == bool and mask.shape == image.shape
        frac = mask.mean()
        if record.class_name == "normal":
            assert frac == 0.0, record.name
        else:
            # non-empty, and never the whole image (RGBA masks are opaque everywhere)
            assert 0.0 < frac < 0.6, (record.name, frac)
        if len(record.masks) > 1:
            singles = [np.asarray(Image.open(p).convert("RGB")).max(axis=-1) > 0 for p in record.masks]
            np.testing.assert_array_equal(mask, np.logical_or.reduce(singles), err_msg=record.name)
        return len(record.masks)

    with ThreadPoolExecutor(4) as pool:
        n_masks = list(pool.map(check, records))
    assert sum(1 for n in n_masks if n > 1) >= 1, "BUSI has images with several masks"

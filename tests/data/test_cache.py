"""The three caches give identical samples; the disk cache is reused and invalidated."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from busiseg.data.busi import scan_busi
from busiseg.data.dataset import BusiDataset, DecodedCache, DiskCache, LazyCache, make_cache


def test_disk_and_lazy_equal_memory(tiny_busi: Path, tmp_path: Path):
    records = scan_busi(tiny_busi)
    memory = DecodedCache(records, 64, progress=False)
    disk = DiskCache(records, 64, cache_dir=tmp_path / "c", progress=False)
    lazy = LazyCache(records, 64)
    for i in range(len(records)):
        for other in (disk, lazy):
            a, b = memory.get(i), other.get(i)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
            assert b[1].dtype == bool
    ds_mem, ds_disk = BusiDataset(memory, [0, 5]), BusiDataset(disk, [0, 5])
    for i in range(2):
        for k in ("image", "mask", "label", "index"):
            assert (ds_mem[i][k] == ds_disk[i][k]).all()


def test_disk_cache_reused_then_invalidated(tiny_busi: Path, tmp_path: Path):
    records = scan_busi(tiny_busi)
    first = DiskCache(records, 64, cache_dir=tmp_path / "c", progress=False)
    assert first.built
    again = DiskCache(scan_busi(tiny_busi), 64, cache_dir=tmp_path / "c", progress=False)
    assert not again.built and again.dir == first.dir
    # another preprocessing size is another cache
    assert DiskCache(records, 32, cache_dir=tmp_path / "c", progress=False).built
    # a changed file changes the key
    path = records[0].image
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = DiskCache(scan_busi(tiny_busi), 64, cache_dir=tmp_path / "c", progress=False)
    assert changed.built and changed.dir != first.dir
    assert not list((tmp_path / "c").glob(".*partial*")), "no half-built cache left behind"


def test_disk_cache_survives_pickling_for_workers(tiny_busi: Path, tmp_path: Path):
    cache = DiskCache(scan_busi(tiny_busi), 64, cache_dir=tmp_path / "c", progress=False)
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.get(3)[0], cache.get(3)[0])


def test_make_cache_names_the_key(tiny_busi: Path):
    records = scan_busi(tiny_busi)
    with pytest.raises(ValueError, match="data.cache must be one of"):
        make_cache("ram", records, 64)
    with pytest.raises(ValueError, match="data.cache_dir"):
        make_cache("disk", records, 64)

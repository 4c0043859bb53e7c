"""Decode once, augment per sample.

A cache turns a record into (grey uint8 image, bool mask) at the preprocessing size;
``BusiDataset`` views a subset of a cache and applies the albumentations transform per
sample. Three caches, chosen by ``data.cache``:

- ``memory`` (``DecodedCache``): every record decoded once into two contiguous arrays;
  every bad file is reported in one error before training starts. Fastest; RSS grows
  with the dataset (about 1.25 x size^2 bytes per image).
- ``disk`` (``DiskCache``): decoded once into fixed-size records in a file under
  ``data.cache_dir``, reused by later runs and rebuilt when any image or mask file
  changes (the key hashes names, sizes and modification times). Samples are read with
  positioned reads, so the OS page cache does the caching and the process's RSS stays
  flat however large the dataset is.
- ``none`` (``LazyCache``): decode on every access (for datasets read once).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from busiseg.data.busi import DatasetError, Record, format_problems, load_record

CACHE_MODES = ("memory", "disk", "none")
_DISK_FORMAT = 1


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (bilinear, antialiased) and mask (area-weighted, then >= 0.5) to size x size."""
    img = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(img), np.asarray(m) >= 128


def check_image_size(image_size: int) -> None:
    if image_size < 32 or image_size % 32:
        raise ValueError(f"data.image_size must be a multiple of 32 and >= 32 (U-Net downsamples 5 times), got {image_size}")


def decode_resized(record: Record, image_size: int, in_channels: int) -> tuple[np.ndarray, np.ndarray]:
    image, mask = load_record(record, in_channels)
    return resize_pair(image, mask, image_size)


def decode_many(records: list[Record], indices: Iterable[int], image_size: int, in_channels: int,
                store: Callable[[int, np.ndarray, np.ndarray], None], num_threads: int | None = None,
                description: str | None = None) -> None:
    """Decode ``records[i]`` for each index in threads and hand each result to ``store``.

    Every failure is collected; one DatasetError lists them all at the end.
    """
    indices = list(indices)

    def one(i: int) -> str | None:
        try:
            store(i, *decode_resized(records[i], image_size, in_channels))
        except DatasetError as exc:
            return str(exc)
        return None

    # PIL releases the GIL while decoding PNGs, so threads overlap well.
    with ThreadPoolExecutor(max_workers=num_threads or min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = pool.map(one, indices)
        if description and len(indices) >= 50:
            from rich.progress import track

            results = track(results, total=len(indices), description=description)
        problems = [p for p in results if p is not None]
    if problems:
        raise DatasetError(format_problems(f"{len(problems)} of {len(records)} image(s) cannot be used", problems))


def _image_shape(image_size: int, in_channels: int) -> tuple[int, ...]:
    return (image_size, image_size) + ((3,) if in_channels == 3 else ())


class DecodedCache:
    """All records decoded at one size: ``images`` (N,S,S[,3]) uint8 and ``masks`` (N,S,S) bool."""

    def __init__(self, records: list[Record], image_size: int, in_channels: int = 1, num_threads: int | None = None,
                 progress: bool = True):
        check_image_size(image_size)
        self.records = records
        self.image_size = image_size
        self.in_channels = in_channels
        self.images = np.zeros((len(records),) + _image_shape(image_size, in_channels), dtype=np.uint8)
        self.masks = np.zeros((len(records), image_size, image_size), dtype=bool)

        def store(i: int, image: np.ndarray, mask: np.ndarray) -> None:
            self.images[i], self.masks[i] = image, mask

        decode_many(records, range(len(records)), image_size, in_channels, store, num_threads,
                    f"Decoding {len(records)} images" if progress else None)

    def __len__(self) -> int:
        return len(self.records)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[i], self.masks[i]


def dataset_key(records: list[Record], image_size: int, in_channels: int) -> str:
    """Changes when any file's name, size or modification time changes, or the decoding does."""
    h = hashlib.sha256(json.dumps([_DISK_FORMAT, image_size, in_channels]).encode())
    for r in records:
        for p in (r.image, *r.masks):
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{r.label}\n".encode())
    return h.hexdigest()[:20]


class DiskCache:
    """Decoded records in fixed-size slots of two files, read with positioned reads."""

    def __init__(self, records: list[Record], image_size: int, in_channels: int = 1, cache_dir: str | Path = ".cache",
                 num_threads: int | None = None, progress: bool = True, chunk: int = 512):
        check_image_size(image_size)
        self.records = records
        self.image_size = image_size
        self.in_channels = in_channels
        self.image_shape = _image_shape(image_size, in_channels)
        self.image_bytes = int(np.prod(self.image_shape))
        self.mask_bytes = image_size * image_size
        self.key = dataset_key(records, image_size, in_channels)
        self.dir = Path(cache_dir).expanduser() / self.key
        self.built = False  # True when this call decoded the data (False: reused)
        if not (self.dir / "done.json").exists():
            self._build(num_threads, progress, chunk)
            self.built = True
        self._images_fd = os.open(self.dir / "images.u8", os.O_RDONLY)
        self._masks_fd = os.open(self.dir / "masks.u8", os.O_RDONLY)

    def _build(self, num_threads: int | None, progress: bool, chunk: int) -> None:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.key}.partial-", dir=self.dir.parent))
        try:
            with open(tmp / "images.u8", "wb") as fi, open(tmp / "masks.u8", "wb") as fm:
                for start in range(0, len(self.records), chunk):
                    idx = range(start, min(start + chunk, len(self.records)))
                    images = np.zeros((len(idx),) + self.image_shape, np.uint8)
                    masks = np.zeros((len(idx), self.image_size, self.image_size), np.uint8)

                    def store(i: int, image: np.ndarray, mask: np.ndarray) -> None:
                        images[i - start], masks[i - start] = image, mask

                    desc = f"Caching images {start + 1}-{idx[-1] + 1} of {len(self.records)}" if progress else None
                    decode_many(self.records, idx, self.image_size, self.in_channels, store, num_threads, desc)
                    fi.write(images.tobytes())
                    fm.write(masks.tobytes())
            (tmp / "done.json").write_text(json.dumps({"n": len(self.records), "image_shape": self.image_shape}))
            try:
                os.replace(tmp, self.dir)
            except OSError:  # another process finished the same cache first
                if not (self.dir / "done.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def __len__(self) -> int:
        return len(self.records)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image = np.empty(self.image_shape, np.uint8)
        mask = np.empty((self.image_size, self.image_size), np.uint8)
        if (os.preadv(self._images_fd, [image], i * self.image_bytes) != self.image_bytes
                or os.preadv(self._masks_fd, [mask], i * self.mask_bytes) != self.mask_bytes):
            raise DatasetError(f"{self.dir}: cache file shorter than expected; delete the folder to rebuild it")
        return image, mask.view(bool)

    def __getstate__(self) -> dict:  # DataLoader workers reopen the files
        state = self.__dict__.copy()
        state.pop("_images_fd", None)
        state.pop("_masks_fd", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._images_fd = os.open(self.dir / "images.u8", os.O_RDONLY)
        self._masks_fd = os.open(self.dir / "masks.u8", os.O_RDONLY)

    def __del__(self) -> None:
        for fd in (getattr(self, "_images_fd", None), getattr(self, "_masks_fd", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


class LazyCache:
    """No cache: decode a record on every access (errors surface when a file is read)."""

    def __init__(self, records: list[Record], image_size: int, in_channels: int = 1):
        check_image_size(image_size)
        self.records = records
        self.image_size = image_size
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.records)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return decode_resized(self.records[i], self.image_size, self.in_channels)


def make_cache(mode: str, records: list[Record], image_size: int, in_channels: int = 1,
               cache_dir: str | Path | None = None):
    """The cache named by ``data.cache``."""
    if mode == "memory":
        return DecodedCache(records, image_size, in_channels)
    if mode == "disk":
        if not cache_dir:
            raise ValueError("data.cache=disk needs data.cache_dir (a writable folder)")
        return DiskCache(records, image_size, in_channels, cache_dir)
    if mode == "none":
        return LazyCache(records, image_size, in_channels)
    raise ValueError(f"data.cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")


class BusiDataset(Dataset):
    """Samples ``indices`` of a cache, augmented by ``transform``.

    Returns dicts: ``image`` float (C,H,W) in [0,1], ``mask`` float (1,H,W) in {0,1},
    ``label`` long, ``index`` long (position in the cache's records).
    """

    def __init__(self, cache, indices: list[int], transform: Callable | None = None):
        self.cache = cache
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def record(self, i: int) -> Record:
        return self.cache.records[self.indices[i]]

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        # (position, seed) from EpochSampler: the augmentation is seeded per sample, so an epoch's
        # samples are the same whatever ran before (reproducible runs, exact resume mid-epoch)
        seed = None
        if isinstance(i, tuple):
            i, seed = i
        idx = self.indices[i]
        image, mask = self.cache.get(idx)
        mask = mask.view(np.uint8)
        if self.transform is not None:
            if seed is not None and hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(int(seed))
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image_t = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)
        image_t = image_t.unsqueeze(0) if image_t.ndim == 2 else image_t.permute(2, 0, 1)
        mask_t = torch.from_numpy(np.ascontiguousarray(mask) > 0).float().unsqueeze(0)
        return {
            "image": image_t,
            "mask": mask_t,
            "label": torch.tensor(self.cache.records[idx].label, dtype=torch.long),
            "index": torch.tensor(idx, dtype=torch.long),
        }

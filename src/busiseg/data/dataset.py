"""Decode once, augment per sample.

``DecodedCache`` decodes every record once (grey uint8 image + merged boolean mask,
resized to the preprocessing size) into two contiguous arrays; every bad file is
reported in one error before training starts. ``BusiDataset`` views a subset of the
cache and applies the albumentations transform per sample.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from busiseg.data.busi import DatasetError, Record, format_problems, load_record


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (bilinear, antialiased) and mask (area-weighted, then >= 0.5) to size x size."""
    img = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(img), np.asarray(m) >= 128


class DecodedCache:
    """All records decoded at one size: ``images`` (N,S,S[,3]) uint8 and ``masks`` (N,S,S) bool."""

    def __init__(self, records: list[Record], image_size: int, in_channels: int = 1, num_threads: int | None = None,
                 progress: bool = True):
        if image_size < 32 or image_size % 32:
            raise ValueError(f"data.image_size must be a multiple of 32 and >= 32 (U-Net downsamples 5 times), got {image_size}")
        self.records = records
        self.image_size = image_size
        self.in_channels = in_channels
        shape = (len(records), image_size, image_size) + ((3,) if in_channels == 3 else ())
        self.images = np.zeros(shape, dtype=np.uint8)
        self.masks = np.zeros((len(records), image_size, image_size), dtype=bool)
        self._decode_all(num_threads or min(8, (os.cpu_count() or 1) * 2), progress)

    def _decode_one(self, i: int) -> str | None:
        try:
            image, mask = load_record(self.records[i], self.in_channels)
        except DatasetError as exc:
            return str(exc)
        self.images[i], self.masks[i] = resize_pair(image, mask, self.image_size)
        return None

    def _decode_all(self, num_threads: int, progress: bool) -> None:
        # PIL releases the GIL while decoding PNGs, so threads overlap well.
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            results = pool.map(self._decode_one, range(len(self.records)))
            if progress and len(self.records) >= 50:
                from rich.progress import track

                results = track(results, total=len(self.records), description=f"Decoding {len(self.records)} images")
            problems = [p for p in results if p is not None]
        if problems:
            raise DatasetError(format_problems(f"{len(problems)} of {len(self.records)} image(s) cannot be used", problems))

    def __len__(self) -> int:
        return len(self.records)


class BusiDataset(Dataset):
    """Samples ``indices`` of a DecodedCache, augmented by ``transform``.

    Returns dicts: ``image`` float (C,H,W) in [0,1], ``mask`` float (1,H,W) in {0,1},
    ``label`` long, ``index`` long (position in the cache's records).
    """

    def __init__(self, cache: DecodedCache, indices: list[int], transform: Callable | None = None):
        self.cache = cache
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def record(self, i: int) -> Record:
        return self.cache.records[self.indices[i]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        idx = self.indices[i]
        image = self.cache.images[idx]
        mask = self.cache.masks[idx].view(np.uint8)
        if self.transform is not None:
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

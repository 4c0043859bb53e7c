"""LightningDataModule: folder -> records -> split -> decoded cache -> three datasets."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from busiseg.data.busi import Record, scan_busi, summarize
from busiseg.data.dataset import BusiDataset, make_cache
from busiseg.data.labels import CLASS_NAMES
from busiseg.data.splits import PARTS, HoldoutSplitter, load_split, save_split
from busiseg.distributed import eval_sampler, global_rank

log = logging.getLogger(__name__)


def resolve_num_workers(num_workers: int | str) -> int:
    """``"auto"``: one worker per core beyond the main process, at most 8."""
    if num_workers == "auto":
        return max(0, min(8, (os.cpu_count() or 1) - 1))
    if int(num_workers) < 0:
        raise ValueError(f"data.num_workers must be >= 0 or 'auto', got {num_workers}")
    return int(num_workers)


SAMPLERS = ("shuffle", "balanced")


def balanced_weights(labels: list[int], power: float) -> list[float]:
    """Per-sample drawing weights ``count(label) ** -power`` (``data.sampler=balanced``).

    ``power`` 1: every class is drawn equally often on average; 0.5: the square root of the
    inverse frequency (the rare classes gain, the common one still leads); 0: uniform.
    """
    if power < 0:
        raise ValueError(f"data.balance_power must be >= 0, got {power}")
    counts = {c: labels.count(c) for c in set(labels)}
    return [float(counts[c]) ** -power for c in labels]


class EpochSampler(Sampler):
    """Shuffles ``n`` positions with a generator seeded by ``(seed, epoch)``; yields ``(position, sample seed)``.

    The order and each sample's augmentation seed depend only on the seed and the epoch
    (Lightning calls ``set_epoch``), not on the global RNG, so a run resumed mid-epoch can
    skip the batches already trained on (``skip``) and see exactly the rest.

    With ``weights`` (one per position) an epoch is instead ``n`` positions drawn with
    replacement in proportion to them (class-balanced sampling), from the same seeded generator.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, skip: int = 0, weights: list[float] | None = None):
        if weights is not None and (len(weights) != n or min(weights, default=1.0) < 0 or sum(weights) <= 0):
            raise ValueError(f"EpochSampler needs {n} non-negative weights with a positive sum")
        self.n = n
        self.seed = int(seed)
        self.epoch = epoch
        self.skip = skip  # samples to leave out at the start of ``epoch`` (once)
        self.weights = weights

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            weights = torch.as_tensor(self.weights, dtype=torch.float64)
            order = torch.multinomial(weights, self.n, replacement=True, generator=generator).tolist()
        seeds = np.random.SeedSequence([self.seed, self.epoch]).generate_state(self.n).tolist()
        start, self.skip = self.skip, 0
        for j in range(start, self.n):
            yield order[j], seeds[j]


class BusiDataModule(L.LightningDataModule):
    """Reads a BUSI-layout folder (or writes the synthetic phantom there first).

    Args:
        root: dataset folder holding benign/, malignant/, normal/.
        synthetic: if given, generation parameters of the phantom written into ``root``
            on first use (see ``busiseg.data.synthetic.ensure_phantom``).
        image_size: square preprocessing size (multiple of 32).
        in_channels: 1 (grey) or 3.
        train_transform: albumentations pipeline for training samples (config group ``augment``).
        splitter: object with ``split(records) -> {"train","val","test"[, "meta"]}`` (config group
            ``split``: grouped holdout or k-fold; images in no part, e.g. label conflicts dropped by
            the splitter, are not used).
        split_file: reuse this saved split instead of computing one (from code; the config way
            is ``split.file=...``, handled by the splitter).
        split_out: write the split used to this JSON file (the run dir's ``split.json``).
        cache: ``memory`` (decode all once, in RAM), ``disk`` (decode once into
            ``cache_dir``, reused across runs, RSS flat), or ``none`` (decode per access).
        cache_dir: folder for the disk cache.
        seed: seeds the training order and augmentation per epoch (``EpochSampler``); None:
            drawn from torch's global RNG (itself seeded by ``seed_everything``).
        device_resident: keep the decoded training set on the training device and batch
            it there (needs ``cache: memory``; augmentation then runs on the device:
            ``augment_on_device``).
        sampler: ``shuffle`` (every training image once per epoch, in a new order) or
            ``balanced`` (as many draws per epoch, with replacement, each image weighted by
            ``count(its class) ** -balance_power`` in the training part).
        balance_power: the exponent of ``balanced`` (1: classes equally often; 0.5: square root).
    """

    def __init__(
        self,
        root: str,
        synthetic: Mapping[str, Any] | None = None,
        image_size: int = 128,
        in_channels: int = 1,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int | str = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        train_transform: Callable | None = None,
        splitter: Any | None = None,
        split_file: str | None = None,
        split_out: str | None = None,
        cache: str = "memory",
        cache_dir: str | None = None,
        device_resident: bool = False,
        seed: int | None = None,
        sampler: str = "shuffle",
        balance_power: float = 1.0,
    ):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"data.in_channels must be 1 or 3, got {in_channels}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.root = Path(root).expanduser()
        self.synthetic = dict(synthetic) if synthetic else None
        self.image_size = image_size
        self.in_channels = in_channels
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = resolve_num_workers(num_workers)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and self.num_workers > 0
        self.train_transform = train_transform
        self.splitter = splitter or HoldoutSplitter()
        self.split_file = split_file
        self.split_out = split_out
        self.cache_mode = cache
        self.cache_dir = cache_dir
        if device_resident and cache != "memory":
            raise ValueError(f"data.device_resident needs data.cache=memory, got data.cache={cache}")
        self.device_resident = device_resident
        if sampler not in SAMPLERS:
            raise ValueError(f"data.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if sampler == "balanced" and device_resident:
            raise ValueError("data.sampler=balanced is not supported with data.device_resident=true "
                             "(its batch loader shuffles on the device); use data.device_resident=false")
        if balance_power < 0:
            raise ValueError(f"data.balance_power must be >= 0, got {balance_power}")
        self.sampler = sampler
        self.balance_power = float(balance_power)
        self.train_weights: list[float] | None = None  # set by setup() for sampler=balanced
        self._device_loader = None
        self.records: list[Record] = []
        self.split: dict[str, list[str]] = {}
        self.cache = None
        self.seed = seed
        self._resume: tuple[int, int] = (0, 0)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Called on resume (``ResumeState``): the next epoch is ``epoch``, less its first batches."""
        self._resume = (int(epoch), int(batches_done))

    @property
    def exact_resume(self) -> bool:
        """Whether ``resume_at`` reproduces the interrupted epoch's remaining batches exactly: the seeded
        ``EpochSampler`` skips the batches done; the device-resident loader (its own shuffle) and persistent
        workers (augmentation state kept in the workers) do not (docs/reliability.md)."""
        return not self.device_resident and not (self.num_workers > 0 and self.persistent_workers)

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from busiseg.data.synthetic import ensure_phantom

            ensure_phantom(self.root, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return
        if self.synthetic is not None and not self.root.exists():
            self.prepare_data()
        # fitting trains one output per class: a class folder without images is refused (a warning otherwise)
        self.records = scan_busi(self.root, empty_class_ok=stage not in (None, "fit"))
        self.split = load_split(self.split_file) if self.split_file else self.splitter.split(self.records)
        by_name = {r.name: i for i, r in enumerate(self.records)}
        unknown = [n for p in PARTS for n in self.split[p] if n not in by_name]
        if unknown:
            raise ValueError(f"split names {len(unknown)} image(s) not in {self.root}, e.g. {unknown[0]}")
        if self.split_out and global_rank() == 0:  # every DDP rank sets up; one writes
            save_split(self.split, self.split_out)
        self.cache = make_cache(self.cache_mode, self.records, self.image_size, self.in_channels, self.cache_dir)
        index = {p: [by_name[n] for n in self.split[p]] for p in PARTS}
        self.train_dataset = BusiDataset(self.cache, index["train"], self.train_transform)
        self.val_dataset = BusiDataset(self.cache, index["val"])
        self.test_dataset = BusiDataset(self.cache, index["test"])
        for p in PARTS:
            counts = summarize([self.records[i] for i in index[p]])
            log.info("%s: %d images (%s)", p, len(index[p]), ", ".join(f"{c} {counts[c]}" for c in CLASS_NAMES))
        self.train_weights = None
        if self.sampler == "balanced":
            labels = [self.records[i].label for i in index["train"]]
            self.train_weights = balanced_weights(labels, self.balance_power)
            total = sum(self.train_weights)
            share = {c: sum(w for w, y in zip(self.train_weights, labels) if y == c) / total for c in set(labels)}
            log.info("data.sampler=balanced (power %g): expected share of each epoch's draws: %s", self.balance_power,
                     ", ".join(f"{CLASS_NAMES[c]} {share[c]:.2f}" for c in sorted(share)))

    def _loader(self, dataset: BusiDataset, shuffle: bool, batch_size: int) -> DataLoader:
        sampler = None
        if shuffle:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            epoch, batches_done = self._resume
            weights = self.train_weights if dataset is self.train_dataset else None
            sampler = EpochSampler(len(dataset), seed, epoch=epoch, skip=batches_done * batch_size, weights=weights)
        else:  # under DDP: each val/test image on exactly one rank (Lightning's default sampler pads)
            sampler = eval_sampler(dataset)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            # its own generator: creating an iterator does not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(0),
            drop_last=shuffle and len(dataset) > batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self):
        if self.device_resident:
            return self._device_train_loader()
        return self._loader(self.train_dataset, True, self.batch_size)

    def _device_train_loader(self):
        from busiseg.data.device_augment import DeviceBatchLoader

        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if self._device_loader is None or self._device_loader.images.device != device:
            self._device_loader = DeviceBatchLoader(
                torch.from_numpy(self.cache.images).to(device),
                torch.from_numpy(self.cache.masks).to(device),
                torch.tensor([r.label for r in self.records], dtype=torch.long, device=device),
                self.train_dataset.indices,
                self.batch_size,
                shuffle=True,
                drop_last=len(self.train_dataset) > self.batch_size,
            )
        return self._device_loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, False, self.eval_batch_size)

"""The refine stage (``busiseg.models.mask_refiner``): train the mask refiner for a training run.

    python -m busiseg.refine_stage train RUN [--out FILE] [--seed N] [settings]

trains the mask refiner on the lesion images of RUN's training part (RUN/split.json, images from the run's
data root, ground-truth masks at each scan's own size) and writes ``RUN/mask_refiner.pt`` (+ ``.png``: its
loss curve and training crops); ``python -m busiseg.eval ckpt_path=RUN/checkpoints/last.ckpt
mask_refiner=RUN/mask_refiner.pt`` and ``busiseg.predict ... mask_refiner=...`` then use it. Inside
``busiseg.train`` the ``refine_stage`` config group does the same after the fit (:func:`for_training_run`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from busiseg.checkpoint import CheckpointError  # noqa: E402
from busiseg.crop_stage import (  # noqa: E402
    add_run_training_arguments,
    epoch_bar,
    run_data_root,
    save_with_figure,
    score_parts,
    stage_device,
    stage_figure,
    stage_info,
    stage_record,
    trained_or_reused,
    training_lesions,
    training_precision,
)
from busiseg.data.busi import DatasetError, Record, load_record  # noqa: E402
from busiseg.evaluation.runner import EvalResults  # noqa: E402
from busiseg.models.crop_classifier import CropClassifier, CropClassifierError  # noqa: E402
from busiseg.models.mask_refiner import (  # noqa: E402
    BLENDS,
    FORMAT,
    OUTSIDES,
    MaskRefiner,
    MaskRefinerError,
    RefinerSettings,
    check_not_trained_on,
    load_mask_refiner,
    save_mask_refiner,
    train_mask_refiner,
)
from busiseg.models.stage_file import read_stage_file  # noqa: E402

log = logging.getLogger("busiseg.refine_stage")

FILE_NAME = "mask_refiner.pt"


def train_for_split(root: Path, split_file: Path, settings: RefinerSettings, device: str = "auto",
                    precision: str = "auto", progress: bool = True) -> tuple[MaskRefiner, dict[str, Any], np.ndarray]:
    """Train the mask refiner on the lesion images of ``split_file``'s training part under ``root``; returns it,
    what to store beside its weights (time, loss per epoch, where the images came from) and :func:`refiner_figure`."""
    dev = stage_device(device, MaskRefinerError)
    try:
        records = training_lesions(root, split_file)
    except CropClassifierError as exc:
        raise MaskRefinerError(str(exc)) from exc
    dtype = training_precision(dev, precision)
    started = time.perf_counter()
    images, masks = [], []
    for r in records:
        image, mask = load_record(r)
        if not mask.any():
            raise MaskRefinerError(f"{r.masks[0] if r.masks else r.image}: a {r.class_name} image with an empty "
                                   "mask cannot train the mask refiner")
        images.append(image)
        masks.append(mask)
    log.info("mask refiner: %d lesion images of %s (%s), %d epochs on %s%s, seed %d", len(records), split_file, root,
             settings.epochs, dev, ", bf16" if dtype is not None else "", settings.seed)
    with epoch_bar("mask refiner", settings.epochs, progress) as on_epoch:
        model, history = train_mask_refiner(images, masks, settings, [r.name for r in records], dev, dtype,
                                            on_epoch=on_epoch)
    info = stage_info(started, history, root, split_file, dev, dtype)
    log.info("mask refiner trained in %.0f s, last epoch's loss %.3f", info["fit_seconds"], history[-1])
    figure = refiner_figure(history, images, masks, settings,
                            f"mask refiner: {len(records)} lesion images of {split_file}, {info['fit_seconds']:.0f} s")
    return model.cpu(), info, figure


def refiner_figure(history: Sequence[float], images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                   settings: RefinerSettings, title: str, shown: int = 8) -> np.ndarray:
    """RGB picture: the training loss per epoch, and what the refiner learns from (the first ``shown`` training
    crops at the middle test margin, as fed to the network, the ground-truth outline in green)."""
    from busiseg.data.crops import lesion_box, square_crop
    from busiseg.models.crop_classifier import to_grey

    margin = sorted(settings.test_margins)[len(settings.test_margins) // 2]
    boxes = [lesion_box(m) for m in masks[:shown]]
    panels = [(square_crop(to_grey(images[n]), box, margin, settings.size),
               square_crop(masks[n].astype(np.float32), box, margin, settings.size), None, None)
              for n, box in enumerate(boxes)]
    return stage_figure(history, "Dice + BCE", panels, title, max(1, (len(panels) + 1) // 2))


def _read_refiner_file(path: Path) -> dict[str, Any]:
    return read_stage_file(path, FORMAT, MaskRefinerError, "mask refiner", "python -m busiseg.refine_stage train RUN")


def for_training_run(settings: RefinerSettings, root: Path, split_file: Path, net: torch.nn.Module,
                     parts: dict[str, list[Record]], image_size: int, in_channels: int, batch_size: int, *,
                     precision: str, channels_last: bool, device: str, out: Path, progress: bool = True,
                     crop_classifier: CropClassifier | None = None, reuse: bool = False
                     ) -> tuple[MaskRefiner, dict[str, Any], dict[str, EvalResults]]:
    """The refine stage inside ``busiseg.train`` (``refine_stage=default``): train the mask refiner on the lesion
    images of ``split_file``'s training part, write it to ``out`` (with its figure), and evaluate ``net`` with it on
    each part of ``parts`` (``{part: records}``) by the runner, at ``precision`` (the run's resolved
    ``trainer.precision``), on the CPU. Returns the refiner (for the crop stage to read its masks), what the run's
    ``metrics.json`` records about the stage, and ``{part: results}``. ``reuse`` (a resumed run): a file at ``out``
    trained with these settings on this split is read, not retrained."""
    dtype = "bf16-mixed" if precision.startswith("bf16") else "32"
    model, info = trained_or_reused(out, settings, root, split_file, dtype, reuse, _read_refiner_file,
                                    load_mask_refiner,
                                    lambda: train_for_split(root, split_file, settings, device, dtype, progress),
                                    save_mask_refiner)
    results = score_parts(net, parts, image_size, in_channels, batch_size, precision=precision,
                          channels_last=channels_last, progress=progress,
                          check=lambda names: check_not_trained_on(model, names, out),
                          crop_classifier=crop_classifier, mask_refiner=model)
    return model, stage_record(out, info, model.trained_on, settings), results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m busiseg.refine_stage", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the mask refiner on a run's training part")
    defaults = RefinerSettings()
    add_run_training_arguments(train, FILE_NAME, defaults, "crop side fed to the refiner (px)",
                               "refine_stage")
    train.add_argument("--blend", choices=BLENDS, default=defaults.blend)
    train.add_argument("--outside", choices=OUTSIDES, default=defaults.outside,
                       help="beyond the crops around the largest component: keep the network's mask, or erase it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        split_file = args.run / "split.json"
        if not split_file.is_file():
            raise MaskRefinerError(f"{split_file}: not found (RUN is a training run dir: split.json, checkpoints/)")
        seed = args.seed if args.seed is not None else run_seed(args.run, args.checkpoint)
        settings = RefinerSettings(size=args.size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                   weight_decay=args.weight_decay, blend=args.blend, outside=args.outside,
                                   seed=seed)
        root = args.data_root or run_data_root(args.run, args.checkpoint)
        model, info, figure = train_for_split(root, split_file, settings, args.device, progress=not args.no_progress)
        path = save_with_figure(model, args.out or args.run / FILE_NAME, figure, save_mask_refiner, run=str(args.run),
                                **info)
        print(f"mask refiner: {path} ({len(model.trained_on)} lesion images, {info['fit_seconds']:.0f} s); "
              f"use it with: python -m busiseg.eval ckpt_path={args.run / 'checkpoints' / args.checkpoint} "
              f"mask_refiner={path}")
    except (MaskRefinerError, CropClassifierError, CheckpointError, DatasetError) as exc:
        print(f"busiseg: error: {exc}", file=sys.stderr)
        return 2
    return 0


def stage_seed(seed: int, split: Any) -> int:
    """The refiner's seed when ``refine_stage.seed`` is null: the run's seed plus its k-fold fold (0 otherwise),
    so each fold's refiner draws its own crops (as the e54 probe, docs/results.md)."""
    fold = (split or {}).get("fold") if hasattr(split, "get") else None
    return int(seed) + (int(fold) if fold is not None else 0)


def run_seed(run: Path, checkpoint: str = "last.ckpt") -> int:
    """:func:`stage_seed` of a training run, from its checkpoint's stored config."""
    from busiseg.checkpoint import read_checkpoint

    config = (read_checkpoint(run / "checkpoints" / checkpoint).get("hyper_parameters") or {}).get("config") or {}
    return stage_seed(int(config.get("seed", 42)), config.get("split"))


if __name__ == "__main__":
    sys.exit(main())

"""The scan stage (``busiseg.models.scan_classifier``): train the whole-scan classifier for a training run.

    python -m busiseg.scan_stage train RUN [--out FILE] [--seed N] [settings]

trains the normal/benign/malignant classifier on the whole scans of RUN's training part (RUN/split.json, images
from the run's data root) and writes ``RUN/scan_classifier.pt`` (+ ``.png``: its loss curve and training
scans); ``python -m busiseg.eval ckpt_path=RUN/checkpoints/last.ckpt scan_classifier=RUN/scan_classifier.pt``
and ``busiseg.predict ... scan_classifier=...`` then average its class probabilities with the network's (or the
two-stage ones, with ``crop_classifier=``). Inside ``busiseg.train`` the ``scan_stage`` config group does the
same after the fit and the other stages (:func:`for_training_run`): ``test_scan_stage/*`` and
``predictions_scan_stage.csv``.
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
    training_precision,
    training_records,
)
from busiseg.data.busi import DatasetError, Record, load_record  # noqa: E402
from busiseg.data.labels import CLASS_NAMES  # noqa: E402
from busiseg.evaluation.runner import EvalResults  # noqa: E402
from busiseg.models.crop_classifier import (  # noqa: E402
    ARCHS,
    STARTS,
    CropClassifier,
    CropClassifierError,
    network_encoder,
    read_crop_file,
    save_crop_classifier,
)
from busiseg.models.scan_classifier import (  # noqa: E402
    ScanClassifierError,
    ScanSettings,
    check_not_trained_on,
    load_scan_classifier,
    train_scan_classifier,
    whole_box,
)
from busiseg.refine_stage import run_seed  # noqa: E402

log = logging.getLogger("busiseg.scan_stage")

FILE_NAME = "scan_classifier.pt"


def train_for_split(root: Path, split_file: Path, settings: ScanSettings, device: str = "auto",
                    precision: str = "auto", progress: bool = True, init: dict[str, torch.Tensor] | None = None
                    ) -> tuple[CropClassifier, dict[str, Any], np.ndarray]:
    """Train the scan classifier on every image of ``split_file``'s training part under ``root`` (in the split's
    order); returns it, what to store beside its weights (time, loss per epoch, where the images came from) and
    :func:`scan_figure`. ``init``: the network's encoder weights it starts from (``settings.start == "network"``)."""
    dev = stage_device(device, ScanClassifierError)
    try:
        records = training_records(root, split_file)
    except CropClassifierError as exc:
        raise ScanClassifierError(str(exc)) from exc
    missing = [c for k, c in enumerate(CLASS_NAMES) if not any(r.label == k for r in records)]
    if missing:
        raise ScanClassifierError(f"{split_file}: the training part has no {' or '.join(missing)} image; the scan "
                                  "classifier learns all three classes")
    dtype = training_precision(dev, precision)
    started = time.perf_counter()
    images = [load_record(r)[0] for r in records]
    labels = [r.label for r in records]
    log.info("scan classifier (%s): %d images of %s (%s), %d px, %d epochs on %s%s, seed %d", describe(settings),
             len(records), split_file, root, settings.size, settings.epochs, dev, ", bf16" if dtype is not None else "",
             settings.seed)
    with epoch_bar("scan classifier", settings.epochs, progress) as on_epoch:
        model, history = train_scan_classifier(images, labels, settings, [r.name for r in records], dev, dtype,
                                               on_epoch=on_epoch, init=init)
    info = stage_info(started, history, root, split_file, dev, dtype)
    log.info("scan classifier trained in %.0f s, last epoch's loss %.3f", info["fit_seconds"], history[-1])
    figure = scan_figure(history, images, labels, settings,
                         f"scan classifier ({describe(settings)}): {len(records)} images of {split_file}, "
                         f"{info['fit_seconds']:.0f} s")
    return model.cpu(), info, figure


def describe(settings: ScanSettings) -> str:
    """"ResNet-34 from the network's encoder", "ResNet-18 from scratch": what the classifier is and starts from."""
    name = settings.arch.replace("resnet", "ResNet-")
    return f"{name} from the network's encoder" if settings.start == "network" else f"{name} from scratch"


def scan_figure(history: Sequence[float], images: Sequence[np.ndarray], labels: Sequence[int],
                settings: ScanSettings, title: str, per_class: int = 2) -> np.ndarray:
    """RGB picture: the training loss per epoch, and what the classifier reads (the first ``per_class`` training
    scans of each class, squared and resized as fed to the network)."""
    from busiseg.data.crops import square_crop
    from busiseg.models.crop_classifier import to_grey

    colours = {"normal": "#4c72b0", "benign": "#55a868", "malignant": "#c44e52"}
    picks = [i for k in range(len(CLASS_NAMES)) for i in [j for j, lab in enumerate(labels) if lab == k][:per_class]]
    panels = [(square_crop(to_grey(images[i]), whole_box(images[i]), 1.0, settings.size), None,
               CLASS_NAMES[labels[i]], colours[CLASS_NAMES[labels[i]]]) for i in picks]
    return stage_figure(history, "cross-entropy", panels, title, max(1, -(-len(panels) // 2)))


def trained_or_reused_scan(out: Path, settings: ScanSettings, root: Path, split_file: Path, dtype: str, reuse: bool,
                           device: str = "auto", progress: bool = True,
                           init: dict[str, torch.Tensor] | None = None) -> tuple[CropClassifier, dict[str, Any]]:
    """The scan classifier at ``out`` when ``reuse`` and it was trained with ``settings`` on ``split_file``'s
    training part (read once), else trained (from ``init``, the network's encoder, where ``settings.start`` says
    so) and written there. The file stores the crop classifier's settings it was trained with
    (:meth:`ScanSettings.crop_settings`), so those are what it is compared with."""
    return trained_or_reused(out, settings.crop_settings(), root, split_file, dtype, reuse, read_crop_file,
                             load_scan_classifier,
                             lambda: train_for_split(root, split_file, settings, device, dtype, progress, init),
                             save_crop_classifier)


def for_training_run(settings: ScanSettings, root: Path, split_file: Path, net: torch.nn.Module,
                     parts: dict[str, list[Record]], image_size: int, in_channels: int, batch_size: int, *,
                     precision: str, channels_last: bool, device: str, out: Path, progress: bool = True,
                     crop_classifier: CropClassifier | None = None, mask_refiner: Any = None, reuse: bool = False
                     ) -> tuple[dict[str, Any], dict[str, EvalResults]]:
    """The scan stage inside ``busiseg.train`` (``scan_stage=default``): train the scan classifier on the images of
    ``split_file``'s training part, write it to ``out`` (with its figure), and evaluate ``net`` with it, and with
    the run's other stages (``crop_classifier``, ``mask_refiner``), on each part of ``parts`` by the runner, at
    ``precision``, on the CPU. Returns what the run's ``metrics.json`` records about the stage, and
    ``{part: results}``. ``reuse`` (a resumed run): a file at ``out`` trained with these settings on this split is
    read, not retrained. With ``settings.start == "network"`` the classifier starts from ``net``'s encoder."""
    dtype = "bf16-mixed" if precision.startswith("bf16") else "32"
    init = network_encoder(net) if settings.start == "network" else None
    model, info = trained_or_reused_scan(out, settings, root, split_file, dtype, reuse, device, progress, init)
    results = score_parts(net, parts, image_size, in_channels, batch_size, precision=precision,
                          channels_last=channels_last, progress=progress,
                          check=lambda names: check_not_trained_on(model, names, out),
                          crop_classifier=crop_classifier, mask_refiner=mask_refiner, scan_classifier=model)
    return stage_record(out, info, model.trained_on, settings), results


def run_encoder(ckpt: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The arch and encoder weights of the network in the training checkpoint ``ckpt``, for ``--start network``;
    an encoder the classifier cannot be is refused with a message naming the file."""
    from busiseg.checkpoint import load_model

    net, config = load_model(ckpt)
    arch = str((config.get("model") or {}).get("encoder_name", ""))
    if arch not in ARCHS:
        raise ScanClassifierError(f"{ckpt}: the network's encoder is {arch or 'unknown'}; --start network needs one "
                                  f"of {', '.join(ARCHS)} (or --start scratch)")
    return arch, network_encoder(net)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m busiseg.scan_stage", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the scan classifier on a run's training part")
    add_run_training_arguments(train, FILE_NAME, ScanSettings(), "side the scan is resized to (px)",
                               "scan_stage")
    train.add_argument("--start", choices=STARTS, default=ScanSettings().start,
                       help="scratch: a ResNet-18 with random weights; network: the run's network's encoder (a "
                            "ResNet of its arch, read from --checkpoint), fine-tuned")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        split_file = args.run / "split.json"
        if not split_file.is_file():
            raise ScanClassifierError(f"{split_file}: not found (RUN is a training run dir: split.json, checkpoints/)")
        seed = args.seed if args.seed is not None else run_seed(args.run, args.checkpoint)
        arch, init = "resnet18", None
        if args.start == "network":
            arch, init = run_encoder(args.run / "checkpoints" / args.checkpoint)
        settings = ScanSettings(size=args.size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                weight_decay=args.weight_decay, seed=seed, arch=arch, start=args.start)
        root = args.data_root or run_data_root(args.run, args.checkpoint)
        model, info, figure = train_for_split(root, split_file, settings, args.device, progress=not args.no_progress,
                                              init=init)
        path = save_with_figure(model, args.out or args.run / FILE_NAME, figure, save_crop_classifier,
                                run=str(args.run), **info)
        print(f"scan classifier: {path} ({len(model.trained_on)} images, {info['fit_seconds']:.0f} s); "
              f"use it with: python -m busiseg.eval ckpt_path={args.run / 'checkpoints' / args.checkpoint} "
              f"scan_classifier={path}")
    except (ScanClassifierError, CropClassifierError, CheckpointError, DatasetError) as exc:
        print(f"busiseg: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

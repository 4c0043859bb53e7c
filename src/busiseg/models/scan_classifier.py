"""The scan stage: a normal/benign/malignant classifier on the whole scan, beside the multi-task network.

Most of ``busi_cpu``'s diagnostic errors are between normal and a lesion, and neither other stage touches
P(normal) (the crop stage only splits benign from malignant). This third network reads the whole scan at
``ScanSettings.size`` px (224 for ``scan_stage=default``, against the multi-task network's 128) and gives its
own three class probabilities; the recipe's diagnosis is the mean of those and the two-stage (or the network's)
probabilities (:func:`join_scan_probs`). It is the crop stage's network and training loop
(:mod:`busiseg.models.crop_classifier`: torchvision ResNet-18 from scratch, one channel, AdamW one-cycle, flips
and brightness/contrast) with the scan's own square as the "crop": the longer side, the shorter padded with
black (:func:`whole_box`), cut during training with a margin of U(``zoom``) and moved by up to ``jitter`` of
the side, read at test whole and mirrored. ``ScanSettings.start="network"`` (e78) makes it a ResNet of the
multi-task network's own encoder (ResNet-34 for ``busi_cpu``) started from that encoder's weights and fine-tuned
the same way. Measured in docs/results.md (e67, e78); entry points:
``scan_stage=default`` in ``busiseg.train``, ``python -m busiseg.scan_stage train RUN``, and the
``scan_classifier=`` key of eval and predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from busiseg.data.crops import Box
from busiseg.data.labels import CLASS_NAMES
from busiseg.models.crop_classifier import (
    FORMAT,
    CropClassifier,
    CropClassifierError,
    CropSettings,
    load_crop_classifier,
    train_crop_classifier,
)
from busiseg.models.stage_file import read_stage_file, refuse_trained_on


class ScanClassifierError(CropClassifierError):
    """A scan-classifier file or setting that cannot be used; the message names it."""


@dataclass
class ScanSettings:
    """How the scan classifier is trained (the e67 probe's values, docs/results.md).

    size: the side the scan's square is resized to (px). epochs, batch_size, lr, weight_decay: AdamW with a
    one-cycle schedule (20 % warm-up). zoom: a training square's side is the scan's longer side times U(lo, hi)
    (below 1 zooms in); jitter: its centre moves by up to this share of the side (each axis). seed: the
    training's random seed. arch: the torchvision ResNet (resnet18, resnet34, resnet50); start: ``"scratch"``
    (random weights) or ``"network"``: the run's multi-task network's encoder, which must then be of ``arch``
    (``busiseg.train`` takes ``model.encoder_name`` where ``arch`` is null), fine-tuned on the whole scans (e78,
    docs/results.md)."""

    size: int = 224
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    zoom: tuple[float, float] = (0.85, 1.15)
    jitter: float = 0.08
    seed: int = 0
    arch: str = "resnet18"
    start: str = "scratch"

    def __post_init__(self) -> None:
        self.zoom = tuple(float(v) for v in self.zoom)  # type: ignore[assignment]
        try:
            self.crop_settings()
        except CropClassifierError as exc:
            raise ScanClassifierError(str(exc).replace("crop classifier", "scan classifier")
                                      .replace("train_margin", "zoom")) from exc

    def crop_settings(self) -> CropSettings:
        """The crop classifier's settings that train and read whole scans this way."""
        return CropSettings(size=self.size, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                            weight_decay=self.weight_decay, train_margin=self.zoom, jitter=self.jitter,
                            test_margins=(1.0,), seed=self.seed, arch=self.arch, start=self.start)


def whole_box(image: np.ndarray) -> Box:
    """The ``(cy, cx, side)`` box of the whole scan: its centre and its longer side."""
    h, w = image.shape[:2]
    return (h / 2, w / 2, float(max(h, w)))


def train_scan_classifier(images: Sequence[np.ndarray], labels: Sequence[int], settings: ScanSettings,
                          names: Sequence[str] = (), device: str | torch.device = "cpu",
                          autocast: torch.dtype | None = None,
                          on_epoch: Callable[[int, float], None] | None = None,
                          init: dict[str, torch.Tensor] | None = None) -> tuple[CropClassifier, list[float]]:
    """Train on the whole ``images`` (uint8, at their own size) with ``labels`` 0 normal, 1 benign, 2 malignant;
    ``names`` are recorded as the images it was trained on. ``init``: with ``settings.start == "network"``, the
    multi-task network's encoder weights (``busiseg.models.crop_classifier.network_encoder``). Returns the network
    (eval mode) and the mean training loss of each epoch."""
    try:
        return train_crop_classifier(images, [whole_box(im) for im in images], labels, settings.crop_settings(),
                                     names, device, autocast, on_epoch, classes=CLASS_NAMES, init=init)
    except CropClassifierError as exc:
        raise ScanClassifierError(str(exc).replace("crop classifier", "scan classifier")) from exc


def scan_probs(model: CropClassifier, images: Sequence[np.ndarray], autocast: torch.dtype | None = None) -> np.ndarray:
    """(N, 3) normal/benign/malignant probabilities of the whole scans (each also mirrored, averaged)."""
    check_scan_classes(model.classes, "this classifier")
    return model.lesion_probs(images, [whole_box(im) for im in images], autocast)


def join_scan_probs(class_probs: np.ndarray, scan: np.ndarray) -> np.ndarray:
    """The recipe's (N, 3) diagnosis: the mean of the network's (or the two-stage) probabilities and the scan
    classifier's."""
    class_probs = np.asarray(class_probs, dtype=np.float64)
    scan = np.asarray(scan, dtype=np.float64)
    if class_probs.ndim != 2 or class_probs.shape[1] != 3 or scan.shape != class_probs.shape:
        raise ValueError(f"join_scan_probs needs two (N, 3) arrays, got {class_probs.shape} and {scan.shape}")
    return (class_probs + scan) / 2


def check_scan_classes(classes: Sequence[str], source: str | Path) -> None:
    if tuple(classes) != tuple(CLASS_NAMES):
        hint = (" (a crop-stage file: pass it as crop_classifier=)" if "benign" in classes and "normal" not in classes
                else "")
        raise ScanClassifierError(f"{source}: a classifier of {list(classes)}{hint}; the scan stage needs "
                                  f"{list(CLASS_NAMES)} (python -m busiseg.scan_stage train RUN writes one)")


def load_scan_classifier(path: str | Path, state: dict[str, Any] | None = None) -> CropClassifier:
    """The scan classifier stored at ``path`` (eval mode, CPU); a missing, damaged or crop-stage file is refused
    with a message naming the file. ``state``: the file's content when already read (a resumed run's check of it)."""
    if state is None:
        state = read_stage_file(path, FORMAT, ScanClassifierError, "scan classifier",
                                "python -m busiseg.scan_stage train RUN writes RUN/scan_classifier.pt")
    check_scan_classes(state.get("classes") or (), path)
    return load_crop_classifier(path, state)


def check_not_trained_on(model: CropClassifier, names: Sequence[str], source: str | Path) -> None:
    """Refuse to score images the scan classifier was trained on (names are class/file)."""
    refuse_trained_on(model.trained_on, names, source, ScanClassifierError, "scan classifier",
                      "train it on the run's own training part (python -m busiseg.scan_stage train RUN)")

"""The crop stage: a benign-or-malignant classifier on the lesion crop, at the scan's own resolution.

The multi-task network sees the whole scan at ``data.image_size`` (128 px for ``busi_cpu``), where a
small lesion is a few dozen pixels. This second network (a torchvision ResNet-18, one channel, from
scratch) reads square crops around the lesion, cut at the scan's own scale and area-averaged when
shrunk (:mod:`busiseg.data.crops`), and tells benign from malignant. It is trained on the ground-truth
lesion boxes of a run's training images (:func:`train_crop_classifier`); at inference it reads the crop
around the largest component of the network's own predicted mask (:meth:`CropClassifier.refine`), and
the two opinions are joined by :func:`combine_class_probs`:

    P(normal) = the network's;  P(benign), P(malignant) = P(lesion) x mean(network's P(type | lesion), crop's)

on every image with a drawn mask (the others keep the network's probabilities). With
``CropSettings.normal_boxes`` > 0 it learns a third class, "none", on crops of the normal training images
(the first around the network's own most suspicious spot on each, the others on random and dark spots:
``busiseg.data.crops.peak_box``, ``normal_boxes``), and :func:`combine_none_probs` also takes P(normal) as
the mean of the network's and the crop's P(none) (e57). Measured in docs/results.md (e46-e49, e57); entry
points: ``python -m busiseg.crop_stage train|cv`` and the
``crop_classifier=`` key of eval and predict (docs/two_stage.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from busiseg.data.crops import Box, lesion_box, square_crop
from busiseg.inference import InferenceOptions, postprocess_mask
from busiseg.models.scheduler import one_cycle
from busiseg.models.stage_file import (
    autocast_context,
    crop_batch,
    crop_training_problems,
    read_stage_file,
    refuse_trained_on,
    save_stage_file,
)

FORMAT = "busiseg.crop_classifier/1"
# the crop classifier's two outputs are the multi-task labels 1 and 2
LESION_CLASSES = ("benign", "malignant")
# with normal_boxes > 0: three outputs, the multi-task labels 0 (no lesion in the crop), 1 and 2
NONE_CLASSES = ("none", "benign", "malignant")
# the torchvision ResNets a classifier can be (one input channel); smp's encoders of these names hold the same
# weights under the same keys, without the last layer, so a classifier can start from a network's encoder
ARCHS = ("resnet18", "resnet34", "resnet50")
# where its weights start: "scratch" (random), or "network": the multi-task network's encoder (same arch)
STARTS = ("scratch", "network")


class CropClassifierError(ValueError):
    """A crop-classifier file or setting that cannot be used; the message names it."""


@dataclass
class CropSettings:
    """How the crop classifier is trained and read (the e46 probe's values, docs/results.md).

    size: crop side fed to the network (px). epochs, batch_size, lr, weight_decay: AdamW with a
    one-cycle schedule (20 % warm-up). train_margin: a training crop's side is the lesion box's side
    times U(lo, hi); jitter: its centre moves by up to this share of the side (each axis); flips and
    brightness/contrast too. test_margins: at inference, one crop per margin, each also mirrored,
    probabilities averaged. seed: the training's random seed. normal_boxes: 0, the classifier tells benign
    from malignant and P(normal) stays the network's; N > 0, it also learns "none" on N crops of each normal
    training image (the first around the network's peak region on it, the others on random and dark spots)
    and joins P(normal) too (:func:`combine_none_probs`). arch: the torchvision ResNet it is (``ARCHS``, one input
    channel); start: ``"scratch"`` (random weights) or ``"network"``: the multi-task network's encoder of the same
    arch, handed to :func:`train_crop_classifier` as ``init`` (the scan stage's, e78).
    """

    size: int = 128
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    train_margin: tuple[float, float] = (1.2, 3.0)
    jitter: float = 0.2
    test_margins: tuple[float, ...] = (1.5, 2.0, 2.5)
    seed: int = 0
    normal_boxes: int = 0
    arch: str = "resnet18"
    start: str = "scratch"

    @property
    def classes(self) -> tuple[str, ...]:
        """The classifier's outputs under these settings."""
        return NONE_CLASSES if self.normal_boxes > 0 else LESION_CLASSES

    def __post_init__(self) -> None:
        self.train_margin = tuple(float(v) for v in self.train_margin)  # type: ignore[assignment]
        self.test_margins = tuple(float(v) for v in self.test_margins)
        problems = []
        if self.size < 16:
            problems.append(f"size={self.size} (at least 16 px)")
        if not isinstance(self.normal_boxes, int) or isinstance(self.normal_boxes, bool) or self.normal_boxes < 0:
            problems.append(f"normal_boxes={self.normal_boxes!r} (a whole number, 0 or more)")
        if self.arch not in ARCHS:
            problems.append(f"arch={self.arch!r} (one of {', '.join(ARCHS)})")
        if self.start not in STARTS:
            problems.append(f"start={self.start!r} (one of {', '.join(STARTS)})")
        problems += crop_training_problems(self)
        if problems:
            raise CropClassifierError("crop classifier settings out of range: " + "; ".join(problems))


def make_net(num_classes: int = len(LESION_CLASSES), arch: str = "resnet18") -> torch.nn.Module:
    """A torchvision ResNet (``ARCHS``; ResNet-18 by default) with random weights, one input channel,
    ``num_classes`` outputs (benign, malignant by default)."""
    if arch not in ARCHS:
        raise CropClassifierError(f"arch={arch!r}: the classifier is one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(num_classes=num_classes)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return net


def start_from_encoder(net: torch.nn.Module, encoder: dict[str, torch.Tensor], arch: str) -> None:
    """Copy a multi-task network's encoder weights (its ``unet.encoder.state_dict()``: smp's ResNet encoder of
    ``arch``, the classifier's own arch) into ``net``; its last layer keeps its random weights. An encoder of
    three input channels gives the sum of its first convolution's three filters (the grey scan in all three).
    Weights that do not fit are a CropClassifierError naming the first."""
    encoder = dict(encoder)
    conv1 = encoder.get("conv1.weight")
    if conv1 is not None and conv1.ndim == 4 and conv1.shape[1] == 3:
        encoder["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
    own = net.state_dict()
    wrong = [k for k, v in encoder.items() if k not in own or own[k].shape != v.shape]
    missing = sorted(k for k in own if k not in encoder and not k.startswith("fc."))
    if wrong or missing:
        first = wrong[0] if wrong else missing[0]
        shape = tuple(encoder[first].shape) if first in encoder else "missing"
        raise CropClassifierError(f"start=network: the network's encoder is not a {arch} (its {first}: {shape}); "
                                  "the classifier starts from an encoder of its own arch (or start=scratch)")
    net.load_state_dict(encoder, strict=False)


def network_encoder(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The multi-task network's encoder weights (a copy, on the CPU), what :func:`start_from_encoder` reads."""
    return {k: v.detach().cpu().clone() for k, v in net.unet.encoder.state_dict().items()}


def to_grey(image: np.ndarray) -> np.ndarray:
    """uint8 HxW or HxWx3 -> HxW (the crop classifier reads one channel)."""
    return image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


class CropClassifier(torch.nn.Module):
    """The trained network with the settings it reads crops by, and the images it was trained on.

    ``classes``: its outputs, (benign, malignant) or (none, benign, malignant) for the crop stage
    (``CropSettings.classes``); other sets train and read crops alike but do not combine with the network's."""

    def __init__(self, settings: CropSettings | None = None, trained_on: Sequence[str] = (),
                 classes: Sequence[str] = LESION_CLASSES) -> None:
        super().__init__()
        self.settings = settings or CropSettings()
        self.trained_on = list(trained_on)
        self.classes = tuple(classes)
        self.net = make_net(len(self.classes), self.settings.arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.inference_mode()
    def lesion_probs(self, images: Sequence[np.ndarray], boxes: Sequence[Box], autocast: torch.dtype | None = None,
                     batch_size: int = 64) -> np.ndarray:
        """(N, C) probabilities of ``classes`` (benign, malignant) of the crops around ``boxes`` (one per image),
        averaged over ``settings.test_margins`` and their mirror images. ``autocast``: forward passes under that
        dtype."""
        self.eval()
        device = next(self.parameters()).device
        out = np.zeros((len(images), len(self.classes)))
        margins = self.settings.test_margins
        for start in range(0, len(images), batch_size):
            chunk = range(start, min(start + batch_size, len(images)))
            greys = {i: to_grey(images[i]) for i in chunk}  # once per image, not once per margin
            total = 0
            for margin in margins:
                x = crop_batch([square_crop(greys[i], boxes[i], margin, self.settings.size).astype(np.float32) / 255.0
                            for i in chunk])
                x = x.to(device)
                with autocast_context(device, autocast):
                    total = total + torch.softmax(self(x).float(), 1) + torch.softmax(self(torch.flip(x, [-1])).float(), 1)
            out[start:start + len(chunk)] = (total / (2 * len(margins))).cpu().numpy()
        return out

    def refine(self, images: Sequence[np.ndarray], mask_probs: Sequence[np.ndarray], class_probs: np.ndarray,
               threshold: float = 0.5, autocast: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The two-stage class probabilities of a batch: ``images`` uint8 at their own size, ``mask_probs`` the
        network's mask probabilities at that size, ``class_probs`` its (N, 3) class probabilities. Returns
        (the combined (N, 3) probabilities, the crop classifier's (N, C), NaN where no mask is drawn)."""
        check_crop_classes(self.classes, "this classifier")
        options = InferenceOptions(threshold=threshold, keep_largest=True)
        boxes = [lesion_box(postprocess_mask(np.asarray(p), None, options)) for p in mask_probs]
        drawn = [i for i, b in enumerate(boxes) if b is not None]
        crop = np.full((len(images), len(self.classes)), np.nan)
        if drawn:
            crop[drawn] = self.lesion_probs([images[i] for i in drawn], [boxes[i] for i in drawn], autocast)
        combine = combine_none_probs if self.classes == NONE_CLASSES else combine_class_probs
        return combine(class_probs, crop), crop


def check_crop_classes(classes: Sequence[str], source: str | Path) -> None:
    """Refuse a classifier whose classes do not combine with the network's (e.g. a scan-stage file)."""
    if tuple(classes) not in (LESION_CLASSES, NONE_CLASSES):
        hint = " (a scan-stage file: pass it as scan_classifier=)" if "normal" in classes else ""
        raise CropClassifierError(f"{source}: a crop classifier of classes {list(classes)}{hint} does not combine "
                                  f"with the network's; the crop stage needs {list(LESION_CLASSES)} or "
                                  f"{list(NONE_CLASSES)}")


def combine_class_probs(class_probs: np.ndarray, crop_probs: np.ndarray) -> np.ndarray:
    """(N, 3) normal/benign/malignant probabilities: P(normal) the network's; P(benign) and P(malignant)
    the network's P(lesion) split by the mean of its P(type | lesion) and the crop classifier's (N, 2)
    probabilities. Rows where ``crop_probs`` is NaN (no mask drawn) keep the network's. Rows sum to 1."""
    class_probs = np.asarray(class_probs, dtype=np.float64)
    crop_probs = np.asarray(crop_probs, dtype=np.float64)
    if class_probs.ndim != 2 or class_probs.shape[1] != 3 or crop_probs.shape != (len(class_probs), 2):
        raise ValueError(f"combine_class_probs needs (N, 3) and (N, 2), got {class_probs.shape} and {crop_probs.shape}")
    out = class_probs.copy()
    lesion = class_probs[:, 1:].sum(1)
    given_lesion = np.divide(class_probs[:, 1:], lesion[:, None], out=np.full_like(class_probs[:, 1:], 0.5),
                             where=lesion[:, None] > 0)
    rows = ~np.isnan(crop_probs).any(1)
    out[rows, 1:] = lesion[rows, None] * (given_lesion[rows] + crop_probs[rows]) / 2
    return out


def combine_none_probs(class_probs: np.ndarray, crop_probs: np.ndarray) -> np.ndarray:
    """(N, 3) normal/benign/malignant probabilities from the network's and a 3-class crop classifier's (N, 3)
    none/benign/malignant probabilities: P(normal) the mean of the network's P(normal) and the crop's P(none);
    P(benign) and P(malignant) share the rest in the proportion :func:`combine_class_probs` gives with the
    crop's benign-vs-malignant part. Rows where ``crop_probs`` is NaN (no mask drawn) keep the network's."""
    class_probs = np.asarray(class_probs, dtype=np.float64)
    crop_probs = np.asarray(crop_probs, dtype=np.float64)
    if class_probs.ndim != 2 or class_probs.shape[1] != 3 or crop_probs.shape != (len(class_probs), 3):
        raise ValueError(f"combine_none_probs needs (N, 3) and (N, 3), got {class_probs.shape} and {crop_probs.shape}")
    rows = ~np.isnan(crop_probs).any(1)
    type_given_lesion = np.full((len(crop_probs), 2), np.nan)
    type_given_lesion[rows] = crop_probs[rows, 1:] / crop_probs[rows, 1:].sum(1, keepdims=True)
    out = combine_class_probs(class_probs, type_given_lesion)
    normal = (class_probs[rows, 0] + crop_probs[rows, 0]) / 2
    lesion = out[rows, 1:]
    total = lesion.sum(1, keepdims=True)  # 0 where the network's P(lesion) is: the crop's split then
    split = np.divide(lesion, total, out=type_given_lesion[rows], where=total > 0)
    out[rows, 0] = normal
    out[rows, 1:] = (1 - normal)[:, None] * split
    return out


def check_not_trained_on(model: CropClassifier, names: Sequence[str], source: str | Path) -> None:
    """Refuse to score images the crop classifier was trained on (names are class/file)."""
    refuse_trained_on(model.trained_on, names, source, CropClassifierError, "crop classifier",
                      "train it on the run's own training part (python -m busiseg.crop_stage train RUN)")


# --------------------------------------------------------------------------- training
def train_crop_classifier(images: Sequence[np.ndarray], boxes: Sequence[Box], labels: Sequence[int],
                          settings: CropSettings, names: Sequence[str] = (), device: str | torch.device = "cpu",
                          autocast: torch.dtype | None = None,
                          on_epoch: Callable[[int, float], None] | None = None,
                          classes: Sequence[str] = LESION_CLASSES,
                          init: dict[str, torch.Tensor] | None = None) -> tuple[CropClassifier, list[float]]:
    """Train on random square crops around ``boxes`` (ground-truth lesion boxes at the images' own size);
    ``labels`` index ``classes`` (0 = benign, 1 = malignant); ``names`` are recorded as the images it was trained
    on. ``init``: with ``settings.start == "network"``, the multi-task network's encoder weights it starts from
    (:func:`network_encoder`). Returns the network (eval mode) and the mean training loss of each epoch;
    ``on_epoch(epoch, loss)`` after each."""
    if not len(images) == len(boxes) == len(labels):
        raise ValueError(f"{len(images)} images, {len(boxes)} boxes and {len(labels)} labels")
    labels = np.asarray(labels, dtype=np.int64)
    present = sorted(set(labels.tolist()))
    if present != list(range(len(classes))):
        raise CropClassifierError(f"the crop classifier needs training crops of every class {list(classes)}; got "
                                  f"{[classes[k] for k in present if 0 <= k < len(classes)] or present}")
    if any(b is None for b in boxes):
        raise CropClassifierError("every training image needs a lesion (a non-empty mask)")
    s = settings
    if (init is not None) != (s.start == "network"):
        raise CropClassifierError(f"start={s.start}: " + ("it needs the network's encoder weights (init)" if init is None
                                                          else "encoder weights given (init) to a classifier from scratch"))
    g = np.random.default_rng(s.seed)
    torch.manual_seed(s.seed)
    device = torch.device(device)
    model = CropClassifier(s, names, classes)
    if init is not None:
        start_from_encoder(model.net, init, s.arch)
    model = model.to(device).to(memory_format=torch.channels_last)
    greys = [to_grey(im) for im in images]
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps = s.epochs * math.ceil(len(greys) / s.batch_size)
    sched = one_cycle(opt, steps, pct_start=0.2)  # 20 % warm-up
    history = []
    model.train()
    for epoch in range(s.epochs):
        order = g.permutation(len(greys))
        total = 0.0
        for i in range(0, len(order), s.batch_size):
            idx = order[i:i + s.batch_size]
            crops = []
            for j in idx:
                shift = (g.uniform(-s.jitter, s.jitter), g.uniform(-s.jitter, s.jitter))
                x = square_crop(greys[j], boxes[j], g.uniform(*s.train_margin), s.size, shift).astype(np.float32) / 255.0
                if g.random() < 0.5:
                    x = x[:, ::-1]
                if g.random() < 0.8:  # brightness/contrast around the crop's mean
                    x = np.clip((x - x.mean()) * g.uniform(0.7, 1.3) + x.mean() + g.uniform(-0.2, 0.2), 0, 1)
                crops.append(x)
            xb = crop_batch(crops).to(device).contiguous(memory_format=torch.channels_last)
            yb = torch.from_numpy(labels[idx]).to(device)
            with autocast_context(device, autocast):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(greys))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    # back to the default memory format: inference then runs the same kernels (and rounds the same) as on
    # the network loaded from its file
    return model.to(memory_format=torch.contiguous_format).eval(), history


# --------------------------------------------------------------------------- file
def save_crop_classifier(model: CropClassifier, path: str | Path, **extra: Any) -> Path:
    """Write the weights, settings, training image names and ``extra`` (plain values) to ``path``, atomically;
    the file loads with ``torch.load(weights_only=True)``."""
    return save_stage_file(path, FORMAT, model.net, model.settings, model.trained_on, classes=list(model.classes),
                           **extra)


def read_crop_file(path: str | Path) -> dict[str, Any]:
    """The stored dictionary of a crop-classifier file (no pickled objects run); errors name the file."""
    return read_stage_file(path, FORMAT, CropClassifierError, "crop classifier",
                           "python -m busiseg.crop_stage train RUN writes RUN/crop_classifier.pt")


def load_crop_classifier(path: str | Path, state: dict[str, Any] | None = None) -> CropClassifier:
    """The crop classifier stored at ``path`` (eval mode, CPU); ``state``: the file's content when already
    read (:func:`read_crop_file`)."""
    state = read_crop_file(path) if state is None else state
    try:
        settings = CropSettings(**state["settings"])
        model = CropClassifier(settings, state.get("trained_on") or [], state.get("classes") or LESION_CLASSES)
        model.net.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CropClassifierError(f"{path}: damaged crop-classifier file ({exc.__class__.__name__}: {exc})") from exc
    return model.eval()

"""The mask refiner: a second U-Net that re-draws the lesion on its crop, at the scan's own resolution.

The multi-task network segments the whole scan at ``data.image_size`` (128 px for ``busi_cpu``), where a
small lesion is a few dozen pixels and its edge a pixel or two. This second network (an smp U-Net,
resnet18 encoder from scratch, one channel, half-width decoder) reads square crops around the lesion, cut
at the scan's own scale (:mod:`busiseg.data.crops`), and draws the lesion's mask on them. It is trained on
the ground-truth lesion boxes of a run's training images (:func:`train_mask_refiner`); at inference it reads
the crops around the largest component of the network's own mask (:meth:`MaskRefiner.refine`), and its
probabilities, laid back over the scan (:func:`busiseg.data.crops.paste_crop`), replace the network's inside
the crops (``blend="replace"``, the default) or are averaged with them (``"mean"``); outside the crops the
network's mask stands (``outside="keep"``, the default) or is erased (``"erase"``: the network's other
components go), and on images where the network draws nothing it stands either way. Measured in docs/results.md (e54,
``scripts/probe_crop_refine.py``: over five folds lesion-image Dice +0.017 replacing, +0.012 averaging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from busiseg.data.crops import Box, lesion_box, paste_crop, square_crop
from busiseg.inference import InferenceOptions, postprocess_mask
from busiseg.models.crop_classifier import to_grey
from busiseg.models.scheduler import one_cycle
from busiseg.models.stage_file import (
    autocast_context,
    crop_batch,
    crop_training_problems,
    read_stage_file,
    refuse_trained_on,
    save_stage_file,
)

FORMAT = "busiseg.mask_refiner/1"
BLENDS = ("replace", "mean")
OUTSIDES = ("keep", "erase")


class MaskRefinerError(ValueError):
    """A mask-refiner file or setting that cannot be used; the message names it."""


@dataclass
class RefinerSettings:
    """How the mask refiner is trained and read (the e54 probe's values, docs/results.md).

    size: crop side fed to the network (px). encoder, decoder_channels: the smp U-Net (from scratch).
    epochs, batch_size, lr, weight_decay: AdamW with a one-cycle schedule (20 % warm-up), loss Dice + BCE.
    train_margin: a training crop's side is the lesion box's side times U(lo, hi); jitter: its centre moves
    by up to this share of the side (each axis); mirrors and brightness/contrast too. test_margins: at
    inference, one crop per margin, each also mirrored, probabilities averaged. blend: inside the crops, the
    refiner's probability alone (``replace``) or the ``mean`` of the refiner's and the network's. outside: beyond
    the crops, the network's probability as it is (``keep``) or 0 (``erase``: only the refined lesion is left;
    docs/results.md e61).
    seed: the training's random seed.
    """

    size: int = 128
    encoder: str = "resnet18"
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 16)
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    train_margin: tuple[float, float] = (1.2, 3.0)
    jitter: float = 0.15
    test_margins: tuple[float, ...] = (1.5, 2.0, 2.5)
    blend: str = "replace"
    outside: str = "keep"
    seed: int = 0

    def __post_init__(self) -> None:
        self.train_margin = tuple(float(v) for v in self.train_margin)  # type: ignore[assignment]
        self.test_margins = tuple(float(v) for v in self.test_margins)
        self.decoder_channels = tuple(int(v) for v in self.decoder_channels)
        problems = []
        if self.size < 32 or self.size % 32:
            problems.append(f"size={self.size} (a multiple of 32, the encoder's stride)")
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            problems.append(f"decoder_channels={list(self.decoder_channels)} (five positive widths)")
        problems += crop_training_problems(self)
        if self.blend not in BLENDS:
            problems.append(f"blend={self.blend!r} (one of {', '.join(BLENDS)})")
        if self.outside not in OUTSIDES:
            problems.append(f"outside={self.outside!r} (one of {', '.join(OUTSIDES)})")
        if problems:
            raise MaskRefinerError("mask refiner settings out of range: " + "; ".join(problems))


class MaskRefiner(torch.nn.Module):
    """The trained U-Net with the settings it reads crops by, and the images it was trained on."""

    def __init__(self, settings: RefinerSettings | None = None, trained_on: Sequence[str] = ()) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        self.settings = settings or RefinerSettings()
        self.trained_on = list(trained_on)
        self.net = smp.Unet(self.settings.encoder, encoder_weights=None, in_channels=1, classes=1,
                            decoder_channels=self.settings.decoder_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.inference_mode()
    def crop_probs(self, grey: np.ndarray, box: Box, autocast: torch.dtype | None = None) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
        """The refiner's lesion probability around ``box`` on a grey scan (H x W uint8), laid back over the scan
        and averaged over ``settings.test_margins`` and their mirror images, with its coverage (1 inside the
        largest crop, 0 outside): two float32 (H, W) maps."""
        self.eval()
        device = next(self.parameters()).device
        s = self.settings
        crops = [square_crop(grey, box, m, s.size).astype(np.float32) / 255.0 for m in s.test_margins]
        x = crop_batch(crops).to(device)
        with autocast_context(device, autocast):
            p = torch.sigmoid(self(x).float()) + torch.flip(torch.sigmoid(self(torch.flip(x, [-1])).float()), [-1])
        p = (p / 2)[:, 0].cpu().numpy()
        total = np.zeros(grey.shape, np.float32)
        cover = np.zeros(grey.shape, np.float32)
        for k, margin in enumerate(s.test_margins):
            values, coverage = paste_crop(p[k], box, margin, grey.shape)
            total += values
            cover += coverage
        return np.divide(total, cover, out=np.zeros_like(total), where=cover > 0), np.minimum(cover, 1.0)

    def refine(self, images: Sequence[np.ndarray], mask_probs: Sequence[np.ndarray], threshold: float = 0.5,
               autocast: torch.dtype | None = None) -> list[np.ndarray]:
        """The refined mask probabilities of a batch: ``images`` uint8 at their own size, ``mask_probs`` the
        network's mask probabilities at that size. Inside the crops around the largest component of each
        mask (>= ``threshold``) the refiner's probability is blended in (``settings.blend``); elsewhere the
        network's stands (``settings.outside``: ``keep``) or is set to 0 (``erase``); where no mask is drawn the
        network's stands."""
        options = InferenceOptions(threshold=threshold, keep_largest=True)
        out = []
        for image, prob in zip(images, mask_probs):
            prob = np.asarray(prob, dtype=np.float32)
            if prob.shape != image.shape[:2]:
                raise ValueError(f"mask probabilities of shape {prob.shape} for an image of {image.shape[:2]}")
            box = lesion_box(postprocess_mask(prob, None, options))
            if box is None:
                out.append(prob)
                continue
            out.append(self.lay_back(prob, *self.crop_probs(to_grey(image), box, autocast)))
        return out

    def lay_back(self, prob: np.ndarray, refined: np.ndarray, cover: np.ndarray,
                 outside: str | None = None) -> np.ndarray:
        """The network's mask probability ``prob`` with :meth:`crop_probs`' ``refined`` map blended in where
        ``cover`` says (``settings.blend``), and beyond it kept or erased (``outside``, default
        ``settings.outside``)."""
        if self.settings.blend == "mean":
            refined = (refined + prob) / 2
        if (outside or self.settings.outside) == "erase":
            return cover * refined
        return cover * refined + (1 - cover) * prob


def read_outside(model: MaskRefiner, outside: str | None) -> MaskRefiner:
    """``model`` reading beyond its crops as ``outside`` says (``keep`` or ``erase``) instead of as its file stores
    it; None or "" leaves the stored setting (eval's and predict's ``mask_refiner_outside``)."""
    if outside in (None, ""):
        return model
    if outside not in OUTSIDES:
        raise MaskRefinerError(f"mask_refiner_outside={outside!r}: one of {', '.join(OUTSIDES)} (null: as the "
                               "mask-refiner file stores it)")
    model.settings.outside = str(outside)
    return model


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE (mean over pixels) + 1 - soft Dice per crop (smoothing 1), averaged over the batch."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


def train_mask_refiner(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], settings: RefinerSettings,
                       names: Sequence[str] = (), device: str | torch.device = "cpu",
                       autocast: torch.dtype | None = None,
                       on_epoch: Callable[[int, float], None] | None = None) -> tuple[MaskRefiner, list[float]]:
    """Train on random square crops around the lesion boxes of ``masks`` (ground truth at the images' own size,
    each with a lesion); ``names`` are recorded as the images it was trained on. Returns the network (eval
    mode) and the mean training loss of each epoch; ``on_epoch(epoch, loss)`` after each."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images and {len(masks)} masks")
    boxes = [lesion_box(np.asarray(m) > 0) for m in masks]
    if not boxes or any(b is None for b in boxes):
        raise MaskRefinerError("the mask refiner trains on lesion images: every training mask needs a lesion")
    s = settings
    g = np.random.default_rng(s.seed)
    torch.manual_seed(s.seed)
    device = torch.device(device)
    model = MaskRefiner(s, names).to(device).to(memory_format=torch.channels_last)
    greys = [to_grey(im) for im in images]
    masks_f = [(np.asarray(m) > 0).astype(np.float32) for m in masks]
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps = s.epochs * math.ceil(len(greys) / s.batch_size)
    sched = one_cycle(opt, steps, pct_start=0.2)  # 20 % warm-up
    history = []
    model.train()
    for epoch in range(s.epochs):
        order = g.permutation(len(greys))
        total = 0.0
        for i in range(0, len(order), s.batch_size):
            xs, ys = [], []
            for j in order[i:i + s.batch_size]:
                margin = g.uniform(*s.train_margin)
                shift = (g.uniform(-s.jitter, s.jitter), g.uniform(-s.jitter, s.jitter))
                x = square_crop(greys[j], boxes[j], margin, s.size, shift).astype(np.float32) / 255.0
                y = (square_crop(masks_f[j], boxes[j], margin, s.size, shift) >= 0.5).astype(np.float32)
                if g.random() < 0.5:
                    x, y = x[:, ::-1], y[:, ::-1]
                if g.random() < 0.8:  # brightness/contrast around the crop's mean
                    x = np.clip((x - x.mean()) * g.uniform(0.7, 1.3) + x.mean() + g.uniform(-0.2, 0.2), 0, 1)
                xs.append(x)
                ys.append(y)
            xb = crop_batch(xs).to(device).contiguous(memory_format=torch.channels_last)
            yb = torch.from_numpy(np.stack([np.ascontiguousarray(y) for y in ys]))[:, None].to(device)
            with autocast_context(device, autocast):
                logits = model(xb)
            loss = dice_bce_loss(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(xs)
        history.append(total / len(greys))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    # back to the default memory format: inference then runs the same kernels as on the file's network
    return model.to(memory_format=torch.contiguous_format).eval(), history


def check_not_trained_on(model: MaskRefiner, names: Sequence[str], source: str | Path) -> None:
    """Refuse to score images the mask refiner was trained on (names are class/file)."""
    refuse_trained_on(model.trained_on, names, source, MaskRefinerError, "mask refiner",
                      "train it on the run's own training part")


def save_mask_refiner(model: MaskRefiner, path: str | Path, **extra: Any) -> Path:
    """Write the weights, settings, training image names and ``extra`` (plain values) to ``path``, atomically;
    the file loads with ``torch.load(weights_only=True)``."""
    return save_stage_file(path, FORMAT, model.net, model.settings, model.trained_on, **extra)


def load_mask_refiner(path: str | Path, state: dict[str, Any] | None = None) -> MaskRefiner:
    """The mask refiner stored at ``path`` (eval mode, CPU); errors name the file. ``state``: the file's content
    when already read (a resumed run's check of it)."""
    if state is None:
        state = read_stage_file(path, FORMAT, MaskRefinerError, "mask refiner",
                                "scripts/probe_crop_refine.py trains one per fold")
    try:
        model = MaskRefiner(RefinerSettings(**state["settings"]), state.get("trained_on") or [])
        model.net.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise MaskRefinerError(f"{path}: damaged mask-refiner file ({exc.__class__.__name__}: {exc})") from exc
    return model.eval()

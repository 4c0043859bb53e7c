"""Inference shared by eval and predict: preprocessing, test-time augmentation,
restoring the original size, and post-processing (config group ``inference``).

Every function here works on one network and plain arrays/tensors; the scripts
(eval.py, predict.py) do the file handling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from busiseg.data.labels import LABEL_OF


@dataclass
class InferenceOptions:
    """What happens between the network's logits and the final mask and class.

    threshold: mask probability at or above which a pixel is lesion.
    tta_flip: average the probabilities of the image and its horizontal mirror.
    tta_scales: extra input scales (e.g. [0.75, 1.25]) averaged with scale 1.
    min_component_px: remove lesion components smaller than this (pixels, at the output size).
    fill_holes: fill holes inside lesion components.
    keep_largest: keep only the largest component.
    class_gating: "first what, then where": empty the mask when the class is normal
        with probability >= normal_threshold; when a lesion class is predicted but the
        mask is empty, keep the most probable region (the component around the peak
        probability, at half the peak).
    """

    threshold: float = 0.5
    tta_flip: bool = False
    tta_scales: list[float] = field(default_factory=list)
    min_component_px: int = 0
    fill_holes: bool = False
    keep_largest: bool = False
    class_gating: bool = False
    normal_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"inference.threshold must be in (0, 1), got {self.threshold}")
        if self.min_component_px < 0:
            raise ValueError(f"inference.min_component_px must be >= 0, got {self.min_component_px}")
        if any(s <= 0 for s in self.tta_scales):
            raise ValueError(f"inference.tta_scales must be positive, got {list(self.tta_scales)}")

    @property
    def postprocessing(self) -> bool:
        return bool(self.min_component_px or self.fill_holes or self.keep_largest or self.class_gating)


def prepare_image(image: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 HxW or HxWx3 -> float (C,S,S) in [0,1], resized as the training cache does."""
    # np.array, not asarray: a writable copy (torch.from_numpy warns on Pillow's read-only buffer)
    resized = np.array(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))
    t = torch.from_numpy(np.ascontiguousarray(resized)).float().div_(255.0)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


class Ensemble(torch.nn.Module):
    """Several trained networks as one: mask and class probabilities averaged over the members.

    :func:`predict_probs` (and so eval and predict, TTA included) averages the members'
    probabilities exactly; ``forward`` returns logits of those averages (``logit`` of the mean
    mask probability, ``log`` of the mean class probabilities) for code that expects a network.
    Members must take the same input (size and channels); the caller checks that.
    """

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 networks, got {len(members)}")
        self.members = torch.nn.ModuleList(members)

    def probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask_sum, class_sum = None, None
        for net in self.members:
            mask_logits, class_logits = net(images)
            m, c = torch.sigmoid(mask_logits.float()), torch.softmax(class_logits.float(), dim=1)
            mask_sum = m if mask_sum is None else mask_sum + m
            class_sum = c if class_sum is None else class_sum + c
        n = len(self.members)
        return mask_sum / n, class_sum / n

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask, cls = self.probs(images)
        return torch.logit(mask, eps=1e-7), torch.log(cls.clamp_min(1e-12))


def _forward(net: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(net, Ensemble):
        return net.probs(images)
    mask_logits, class_logits = net(images)
    return torch.sigmoid(mask_logits.float()), torch.softmax(class_logits.float(), dim=1)


def _scaled_size(size: int, scale: float) -> int:
    return max(32, int(round(size * scale / 32)) * 32)


@torch.inference_mode()
def predict_probs(net: torch.nn.Module, images: torch.Tensor,
                  options: InferenceOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask probabilities (B,1,H,W) and class probabilities (B,3), averaged over the TTA views."""
    options = options or InferenceOptions()
    h, w = images.shape[-2:]
    views = [(1.0, False)] + ([(1.0, True)] if options.tta_flip else [])
    for s in options.tta_scales:
        if s != 1.0:
            views += [(s, False)] + ([(s, True)] if options.tta_flip else [])
    mask_sum = torch.zeros(images.shape[0], 1, h, w, device=images.device)
    class_sum = torch.zeros(images.shape[0], 3, device=images.device)
    for scale, flip in views:
        x = images
        if scale != 1.0:
            x = F.interpolate(x, size=(_scaled_size(h, scale), _scaled_size(w, scale)), mode="bilinear",
                              align_corners=False)
        if flip:
            x = torch.flip(x, dims=[-1])
        mask_probs, class_probs = _forward(net, x)
        if flip:
            mask_probs = torch.flip(mask_probs, dims=[-1])
        if mask_probs.shape[-2:] != (h, w):
            mask_probs = F.interpolate(mask_probs, size=(h, w), mode="bilinear", align_corners=False)
        mask_sum += mask_probs
        class_sum += class_probs
    return mask_sum / len(views), class_sum / len(views)


def restore_size(mask_prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a probability map (h,w) to the original (height, width), bilinearly.

    Probabilities are resized, not the binary mask, so edges are smooth at any scale.
    """
    height, width = size
    if mask_prob.shape == (height, width):
        return mask_prob.astype(np.float32)
    return cv2.resize(mask_prob.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def area_resize(mask_prob: np.ndarray, size: int) -> np.ndarray:
    """A probability map at an image's own size back down to the preprocessing size (``size`` x ``size``),
    area-averaged (``cv2.INTER_AREA``): the mask refiner's output, scored where the network's is."""
    if mask_prob.shape == (size, size):
        return mask_prob.astype(np.float32)
    return cv2.resize(mask_prob.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return n, labels, stats


def postprocess_mask(mask_prob: np.ndarray, class_probs: np.ndarray | None, options: InferenceOptions) -> np.ndarray:
    """Threshold a probability map and apply the post-processing steps that are switched on."""
    mask = mask_prob >= options.threshold
    if options.min_component_px and mask.any():
        n, labels, stats = _components(mask)
        small = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] < options.min_component_px]
        mask[np.isin(labels, small)] = False
    if options.fill_holes and mask.any():
        # holes = background components that do not touch the border
        n, labels, _ = _components(~mask)
        border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
        holes = [i for i in range(1, n) if i not in border]
        mask[np.isin(labels, holes)] = True
    if options.keep_largest and mask.any():
        n, labels, stats = _components(mask)
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        mask = labels == largest
    if options.class_gating and class_probs is not None:
        predicted = int(np.argmax(class_probs))
        if predicted == LABEL_OF["normal"] and class_probs[predicted] >= options.normal_threshold:
            mask = np.zeros_like(mask)
        elif predicted != LABEL_OF["normal"] and not mask.any() and mask_prob.max() > 0:
            peak = np.unravel_index(int(np.argmax(mask_prob)), mask_prob.shape)
            n, labels, _ = _components(mask_prob >= 0.5 * mask_prob.max())
            mask = labels == labels[peak]
    return mask

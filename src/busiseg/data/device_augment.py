"""The augmentation recipes on batched tensors, for the device that trains (``data.augment_on_device``).

When a GPU trains faster than the CPU loader can augment, the loader can send
un-augmented cached images and the same recipe runs on the GPU after the batch is
transferred (``MultiTaskModule.on_after_batch_transfer``). Each class mirrors one
function of ``busiseg.data.augment`` with the same parameters and the same semantics,
on float images in [0, 1] instead of uint8:

- brightness ``b``: ``x + b`` (albumentations: ``x + b * 255`` on uint8);
- contrast ``c``: ``x * (1 + c)`` (albumentations multiplies, it does not centre);
- gamma ``g``: ``x ** (g / 100)``;
- Gaussian blur: odd kernel 3 or 5, sigma uniform in [0.5, 3];
- affine: scale, translation (fraction of the size), rotation about the centre;
  bilinear for images, nearest for masks, zeros outside;
- every result clipped to [0, 1].

Random draws are per sample from ``torch`` generators, so they run on the device.
tests/data/test_device_augment.py checks each operation against albumentations with the
same fixed parameters.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _uniform(n: int, lo: float, hi: float, device, generator=None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)


def _chance(n: int, p: float, device, generator=None) -> Tensor:
    return torch.rand(n, device=device, generator=generator) < p


def _bcast(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def flip(images: Tensor, masks: Tensor, which: Tensor) -> tuple[Tensor, Tensor]:
    """Horizontal flip of the samples where ``which`` is true."""
    w = _bcast(which)
    return torch.where(w, images.flip(-1), images), torch.where(w, masks.flip(-1), masks)


def brightness_contrast(images: Tensor, brightness: Tensor, contrast: Tensor) -> Tensor:
    return (images * _bcast(1.0 + contrast) + _bcast(brightness)).clamp_(0.0, 1.0)


def gamma(images: Tensor, gamma_percent: Tensor) -> Tensor:
    return images.clamp(min=0.0).pow(_bcast(gamma_percent / 100.0))


def gaussian_blur(images: Tensor, which: Tensor, generator=None) -> Tensor:
    """Blur the chosen samples: kernel 3 or 5, sigma uniform in [0.5, 3], like A.GaussianBlur((3, 5))."""
    out = images.clone()
    idx = which.nonzero().flatten()
    for i in idx.tolist():
        k = 3 if torch.rand(1, device=images.device, generator=generator).item() < 0.5 else 5
        sigma = float(_uniform(1, 0.5, 3.0, images.device, generator))
        x = torch.arange(k, device=images.device, dtype=images.dtype) - (k - 1) / 2
        kernel = torch.exp(-(x**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        c = images.shape[1]
        img = F.pad(images[i : i + 1], (k // 2, k // 2, k // 2, k // 2), mode="reflect")
        img = F.conv2d(img, kernel.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
        img = F.conv2d(img, kernel.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
        # a kernel summing to 1 in floating point can lift a saturated pixel a rounding step above 1
        out[i] = img[0].clamp_(0.0, 1.0)
    return out


def affine(images: Tensor, masks: Tensor, which: Tensor, scale: Tensor, tx: Tensor, ty: Tensor,
           degrees: Tensor) -> tuple[Tensor, Tensor]:
    """Scale about the centre, rotate by ``degrees`` and shift by (tx, ty) fractions of the size."""
    n = images.shape[0]
    rad = degrees * math.pi / 180.0
    cos, sin = torch.cos(rad), torch.sin(rad)
    # affine_grid maps output -> input coordinates in [-1, 1]: the inverse transform
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = cos / scale
    theta[:, 0, 1] = -sin / scale  # positive degrees turn counter-clockwise, as in albumentations
    theta[:, 1, 0] = sin / scale
    theta[:, 1, 1] = cos / scale
    theta[:, 0, 2] = -(theta[:, 0, 0] * 2 * tx + theta[:, 0, 1] * 2 * ty)
    theta[:, 1, 2] = -(theta[:, 1, 0] * 2 * tx + theta[:, 1, 1] * 2 * ty)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=images.device, dtype=images.dtype)
    theta = torch.where(which.view(-1, 1, 1), theta, identity)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out_images, out_masks


class SeedTensorAugment(nn.Module):
    """``augment.seed_recipe`` on tensors: as-is / lighter / darker (equal odds), flip, blur."""

    def __init__(self, lighter=(0.1, 0.3), darker=(-0.4, -0.1), flip_p: float = 0.5, blur_p: float = 0.2,
                 seed: int | None = None):
        super().__init__()
        self.lighter, self.darker = tuple(lighter), tuple(darker)
        self.flip_p, self.blur_p = flip_p, blur_p

    def forward(self, images: Tensor, masks: Tensor, generator=None) -> tuple[Tensor, Tensor]:
        n, dev = images.shape[0], images.device
        choice = torch.randint(0, 3, (n,), device=dev, generator=generator)
        brightness = torch.where(choice == 1, _uniform(n, *self.lighter, dev, generator), torch.zeros(n, device=dev))
        contrast = torch.where(choice == 2, _uniform(n, *self.darker, dev, generator), torch.zeros(n, device=dev))
        images = brightness_contrast(images, brightness, contrast)
        images, masks = flip(images, masks, _chance(n, self.flip_p, dev, generator))
        images = gaussian_blur(images, _chance(n, self.blur_p, dev, generator), generator)
        return images, masks


class StandardTensorAugment(nn.Module):
    """``augment.standard_recipe`` on tensors: flip, affine, brightness/contrast, gamma, blur or noise."""

    def __init__(self, flip_p=0.5, affine_p=0.5, scale=(0.9, 1.1), translate=0.05, rotate=10.0, brightness=0.2,
                 contrast=0.2, brightness_contrast_p=0.5, gamma=(80, 120), gamma_p=0.3, blur_noise_p=0.2,
                 seed: int | None = None):
        super().__init__()
        self.flip_p, self.affine_p = flip_p, affine_p
        self.scale, self.translate, self.rotate = tuple(scale), translate, rotate
        self.brightness, self.contrast, self.bc_p = brightness, contrast, brightness_contrast_p
        self.gamma, self.gamma_p, self.blur_noise_p = tuple(gamma), gamma_p, blur_noise_p

    def forward(self, images: Tensor, masks: Tensor, generator=None) -> tuple[Tensor, Tensor]:
        n, dev = images.shape[0], images.device
        zeros = torch.zeros(n, device=dev)
        images, masks = flip(images, masks, _chance(n, self.flip_p, dev, generator))
        images, masks = affine(
            images, masks, _chance(n, self.affine_p, dev, generator),
            _uniform(n, *self.scale, dev, generator),
            _uniform(n, -self.translate, self.translate, dev, generator),
            _uniform(n, -self.translate, self.translate, dev, generator),
            _uniform(n, -self.rotate, self.rotate, dev, generator),
        )
        bc = _chance(n, self.bc_p, dev, generator)
        images = brightness_contrast(
            images,
            torch.where(bc, _uniform(n, -self.brightness, self.brightness, dev, generator), zeros),
            torch.where(bc, _uniform(n, -self.contrast, self.contrast, dev, generator), zeros),
        )
        g = _chance(n, self.gamma_p, dev, generator)
        images = gamma(images, torch.where(g, _uniform(n, *self.gamma, dev, generator), torch.full((n,), 100.0, device=dev)))
        pick = _chance(n, self.blur_noise_p, dev, generator)
        use_blur = _chance(n, 0.5, dev, generator)
        images = gaussian_blur(images, pick & use_blur, generator)
        noisy = pick & ~use_blur
        std = _bcast(_uniform(n, 0.02, 0.08, dev, generator))
        noise = torch.randn(images.shape, device=dev, generator=generator) * std
        images = torch.where(_bcast(noisy), (images + noise).clamp(0.0, 1.0), images)
        return images, masks


_RECIPES = {
    "busiseg.data.augment.seed_recipe": SeedTensorAugment,
    "busiseg.data.augment.standard_recipe": StandardTensorAugment,
    "busiseg.data.augment.no_augmentation": None,
}


def from_augment_config(cfg: Mapping[str, Any]) -> nn.Module | None:
    """The tensor twin of an ``augment`` config (same parameters), or None for ``augment=none``."""
    target = cfg.get("_target_")
    if target not in _RECIPES:
        raise ValueError(
            f"data.augment_on_device supports augment={', '.join(t.rsplit('.', 1)[1] for t in _RECIPES)}; "
            f"{target} has no tensor version"
        )
    cls = _RECIPES[target]
    if cls is None:
        return None
    return cls(**{k: v for k, v in cfg.items() if k != "_target_"})


class DeviceBatchLoader:
    """Batches straight from a decoded dataset held on the training device (``data.device_resident``).

    The cached uint8 images and boolean masks are copied to the device once; each epoch
    draws a permutation there and slices batches, so nothing crosses the PCIe bus per
    step. Batches have the DataLoader's format (``image``, ``mask``, ``label``,
    ``index``); augmentation happens after, in ``MultiTaskModule.on_after_batch_transfer``.
    """

    def __init__(self, images: Tensor, masks: Tensor, labels: Tensor, indices: list[int], batch_size: int,
                 shuffle: bool, drop_last: bool, seed: int = 0):
        self.images, self.masks, self.labels = images, masks, labels
        self.indices = torch.as_tensor(indices, dtype=torch.long, device=images.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = torch.Generator(device=images.device).manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(len(order), device=order.device, generator=self.generator)]
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            image = self.images[idx].float().div_(255.0)
            image = image.unsqueeze(1) if image.ndim == 3 else image.permute(0, 3, 1, 2)
            yield {"image": image, "mask": self.masks[idx].float().unsqueeze(1), "label": self.labels[idx],
                   "index": idx}

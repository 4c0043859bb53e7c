"""Image corruptions for self-supervised pretraining by restoration (``python -m busiseg.pretrain``).

The network sees a corrupted image and learns to give back the original (Models Genesis, Zhou et
al., MICCAI 2019 / Medical Image Analysis 2021): it must learn what ultrasound tissue looks like,
without any label. Three corruptions, applied per image in this order, each with its own probability:

- local pixel shuffling: the pixels inside small square blocks are permuted (texture, not shape);
- a random monotone intensity curve, increasing or (half the time) decreasing: the network must
  recover the original grey levels from the structures alone;
- painting: in-painting (a few boxes filled with noise) or out-painting (everything outside a few
  boxes filled with noise).

Works on batches of images in [0, 1], shape (B, C, H, W), on any device; a ``torch.Generator``
makes it reproducible.
"""

from __future__ import annotations

import torch
from torch import nn


def _check_probability(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"pretrain.corruption.{name} must be in [0, 1], got {value}")
    return value


def shuffle_blocks(images: torch.Tensor, block: int, fraction: float, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Permute the pixels within ``fraction`` of the ``block`` x ``block`` tiles of each image (one
    permutation per tile and channel-shared). H and W must be multiples of ``block``."""
    b, c, h, w = images.shape
    if h % block or w % block:
        raise ValueError(f"image size {h}x{w} is not a multiple of the shuffle block {block}")
    tiles = images.reshape(b, c, h // block, block, w // block, block).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(b, h // block, w // block, c, block * block)
    keys = torch.rand(b, h // block, w // block, block * block, generator=generator, device="cpu").to(images.device)
    chosen = torch.rand(b, h // block, w // block, 1, generator=generator, device="cpu").to(images.device) < fraction
    order = torch.where(chosen, keys.argsort(dim=-1), torch.arange(block * block, device=images.device))
    shuffled = tiles.gather(-1, order.unsqueeze(3).expand_as(tiles))
    shuffled = shuffled.reshape(b, h // block, w // block, c, block, block).permute(0, 3, 1, 4, 2, 5)
    return shuffled.reshape(b, c, h, w)


def monotone_curve(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Map each image's grey levels through its own random piecewise-linear curve with two inner
    knots, increasing, or decreasing for half of the images."""
    b = images.shape[0]
    inner_x = torch.rand(b, 2, generator=generator).sort(dim=1).values
    inner_y = torch.rand(b, 2, generator=generator).sort(dim=1).values
    zeros, ones = torch.zeros(b, 1), torch.ones(b, 1)
    xs = torch.cat([zeros, inner_x, ones], dim=1).to(images.device)  # (B, 4)
    ys = torch.cat([zeros, inner_y, ones], dim=1).to(images.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    ys = torch.where(flip[:, None], 1.0 - ys, ys)
    flat = images.reshape(b, -1).clamp(0.0, 1.0)
    seg = torch.searchsorted(xs[:, 1:-1].contiguous(), flat.contiguous(), right=True)  # 0..2: which piece
    x0, x1 = xs.gather(1, seg), xs.gather(1, seg + 1)
    y0, y1 = ys.gather(1, seg), ys.gather(1, seg + 1)
    t = (flat - x0) / (x1 - x0).clamp_min(1e-6)
    return (y0 + t * (y1 - y0)).reshape(images.shape)


def _box(h: int, w: int, low: float, high: float, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """A random box whose sides are between ``low`` and ``high`` of the image's."""
    u = torch.rand(4, generator=generator).tolist()
    bh = max(1, int(h * (low + (high - low) * u[0])))
    bw = max(1, int(w * (low + (high - low) * u[1])))
    y0 = int((h - bh) * u[2])
    x0 = int((w - bw) * u[3])
    return y0, y0 + bh, x0, x0 + bw


def paint(image: torch.Tensor, outpaint: bool, boxes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """In-painting: ``boxes`` boxes (1/6 to 1/4 of each side) filled with uniform noise; out-painting:
    all but ``boxes`` boxes (3/7 to 4/7 of each side) filled with noise. ``image``: (C, H, W)."""
    c, h, w = image.shape
    noise = torch.rand(image.shape, generator=generator).to(image.device)
    keep = torch.zeros(h, w, dtype=torch.bool, device=image.device)
    low, high = (3 / 7, 4 / 7) if outpaint else (1 / 6, 1 / 4)
    for _ in range(boxes):
        y0, y1, x0, x1 = _box(h, w, low, high, generator)
        keep[y0:y1, x0:x1] = True
    region = keep if outpaint else ~keep  # where the original stays
    return torch.where(region, image, noise)


class RestorationCorruption(nn.Module):
    """The Models Genesis corruptions on a batch (see the module docstring).

    Args:
        shuffle_p: probability that an image gets local pixel shuffling.
        shuffle_block: side of the shuffled tiles, in pixels (divides the image size).
        shuffle_fraction: fraction of an image's tiles that are shuffled.
        curve_p: probability of the random monotone intensity curve.
        paint_p: probability of in- or out-painting.
        outpaint_p: given painting, the probability that it is out-painting (else in-painting).
        boxes: the number of boxes painted (in) or kept (out).
        seed: seeds the generator (None: torch's global random state).
    """

    def __init__(self, shuffle_p: float = 0.5, shuffle_block: int = 4, shuffle_fraction: float = 0.5,
                 curve_p: float = 0.9, paint_p: float = 0.9, outpaint_p: float = 0.8, boxes: int = 4,
                 seed: int | None = None):
        super().__init__()
        self.shuffle_p = _check_probability("shuffle_p", shuffle_p)
        self.shuffle_fraction = _check_probability("shuffle_fraction", shuffle_fraction)
        self.curve_p = _check_probability("curve_p", curve_p)
        self.paint_p = _check_probability("paint_p", paint_p)
        self.outpaint_p = _check_probability("outpaint_p", outpaint_p)
        if int(shuffle_block) < 2:
            raise ValueError(f"pretrain.corruption.shuffle_block must be >= 2 pixels, got {shuffle_block}")
        if int(boxes) < 1:
            raise ValueError(f"pretrain.corruption.boxes must be >= 1, got {boxes}")
        self.shuffle_block = int(shuffle_block)
        self.boxes = int(boxes)
        self.generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    def _coin(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) < p

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Corrupted copies of ``images`` (B, C, H, W) in [0, 1]; the input is not changed."""
        x = images.float()
        b = x.shape[0]
        dev = x.device
        pick = self._coin(b, self.shuffle_p).to(dev)[:, None, None, None]
        x = torch.where(pick, shuffle_blocks(x, self.shuffle_block, self.shuffle_fraction, self.generator), x)
        pick = self._coin(b, self.curve_p).to(dev)[:, None, None, None]
        x = torch.where(pick, monotone_curve(x, self.generator), x)
        painted = self._coin(b, self.paint_p).tolist()
        outpaint = self._coin(b, self.outpaint_p).tolist()
        x = torch.stack([paint(x[i], outpaint[i], self.boxes, self.generator) if painted[i] else x[i]
                         for i in range(b)])
        return x.to(images.dtype)

"""Batch mixing (config group ``mix``): Mixup and CutMix of training batches.

Both mix each training batch with a shuffled copy of itself, images, masks and class targets
alike, so the two tasks see the same mixed sample:

- ``mixup`` (Zhang et al., ICLR 2018): ``x = lam * x_a + (1 - lam) * x_b``; the mask becomes the same
  blend (a soft target in [0, 1]) and the class target ``lam * one_hot(a) + (1 - lam) * one_hot(b)``.
- ``cutmix`` (Yun et al., ICCV 2019): a box covering a ``1 - lam`` share of the image is cut from
  ``x_b`` and pasted into ``x_a``, mask included (masks stay binary); the class target is mixed by the
  share of the image each source actually covers after the box is clipped to the image.

``lam`` is drawn from Beta(alpha, alpha), once per batch, and a batch is mixed with probability ``p``.
The draws come from a generator seeded with ``(seed, step)``: the same run mixes the same way, and a
resumed run continues exactly. Mixing happens on the training device after the batch arrives
(``MultiTaskModule.on_after_batch_transfer``); validation and test batches are never mixed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from busiseg.data.labels import NUM_CLASSES

KINDS: tuple[str, ...] = ("mixup", "cutmix")


class BatchMix(nn.Module):
    """Mix a batch with a permutation of itself.

    Args:
        kind: ``"mixup"`` or ``"cutmix"``.
        alpha: the Beta(alpha, alpha) parameter of the mixing share ``lam`` (> 0; 1 = uniform).
        p: probability that a batch is mixed (0-1); an unmixed batch gets one-hot targets.
        num_classes: length of the class targets.
        seed: base seed of the per-step draws (the run's ``seed``).
    """

    def __init__(self, kind: str = "cutmix", alpha: float = 1.0, p: float = 0.5,
                 num_classes: int = NUM_CLASSES, seed: int = 0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"mix.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not float(alpha) > 0:
            raise ValueError(f"mix.alpha must be > 0, got {alpha!r}")
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"mix.p must be in [0, 1], got {p!r}")
        self.kind, self.alpha, self.p = kind, float(alpha), float(p)
        self.num_classes, self.seed = int(num_classes), int(seed)

    def forward(self, images: Tensor, masks: Tensor, labels: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(images, masks, class_targets)``: the targets are float ``(B, num_classes)`` probabilities."""
        targets = F.one_hot(labels.long().view(-1), self.num_classes).to(torch.float32)
        n = images.shape[0]
        rng = np.random.default_rng([self.seed, int(step)])
        if n < 2 or rng.random() >= self.p:
            return images, masks, targets
        perm = torch.as_tensor(rng.permutation(n), device=images.device)
        lam = float(rng.beta(self.alpha, self.alpha))
        if self.kind == "mixup":
            mixed_images = lam * images + (1.0 - lam) * images[perm]
            mixed_masks = lam * masks + (1.0 - lam) * masks[perm]
        else:
            mixed_images, mixed_masks = images.clone(), masks.clone()
            y0, y1, x0, x1 = self._box(rng, images.shape[-2], images.shape[-1], lam)
            mixed_images[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
            mixed_masks[..., y0:y1, x0:x1] = masks[perm][..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (images.shape[-2] * images.shape[-1])
        return mixed_images, mixed_masks, lam * targets + (1.0 - lam) * targets[perm.to(targets.device)]

    @staticmethod
    def _box(rng: np.random.Generator, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
        """A box of about ``1 - lam`` of the image around a uniform centre, clipped to the image."""
        cut = float(np.sqrt(1.0 - lam))
        h, w = int(round(height * cut)), int(round(width * cut))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - h // 2, 0), min(cy + h - h // 2, height)
        x0, x1 = max(cx - w // 2, 0), min(cx + w - w // 2, width)
        return y0, y1, x0, x1

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, alpha={self.alpha}, p={self.p}"

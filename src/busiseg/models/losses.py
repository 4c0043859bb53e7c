"""Losses of the multi-task network: segmentation, classification, and how the two are weighted.

Tensor conventions (the whole package uses them):

* ``mask_logits``: float ``(B, 1, H, W)``, raw logits of the lesion mask;
* ``masks``: float ``(B, 1, H, W)`` with values in ``{0, 1}`` (``(B, H, W)`` is accepted too);
* ``class_logits``: float ``(B, C)`` raw logits, ``C = NUM_CLASSES = 3``;
* ``labels``: long ``(B,)`` with values in ``0 .. C - 1`` (see :mod:`busiseg.data.labels`), or float ``(B, C)``
  class probabilities for mixed batches (:mod:`busiseg.data.mixing`); masks are then soft too.

Every constructor takes plain values (floats, str, lists) or modules, so that Hydra can build the whole loss
from a nested config through ``_target_``. For example::

    loss:
      _target_: busiseg.models.losses.MultiTaskLoss
      segmentation: {_target_: busiseg.models.losses.SegmentationLoss, dice_weight: 1.0, bce_weight: 1.0}
      classification: {_target_: busiseg.models.losses.ClassificationLoss, kind: mse}
      weighting: {_target_: busiseg.models.losses.FixedWeighting, w_seg: 1.0, w_cls: 1.0}

:class:`UncertaintyWeighting` has learnable parameters: the :class:`MultiTaskLoss` must be a submodule of the
LightningModule (``self.loss = ...``) so that they reach the optimizer (preferably without weight decay).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from busiseg.data.labels import NUM_CLASSES

__all__ = [
    "ClassificationLoss",
    "FixedWeighting",
    "MultiTaskLoss",
    "SegOnlyWeighting",
    "SegmentationLoss",
    "TaskWeighting",
    "UncertaintyWeighting",
]

CLASSIFICATION_KINDS: tuple[str, ...] = ("mse", "ce")
DICE_REDUCTIONS: tuple[str, ...] = ("batch", "lesion_images")


def _check_weight(value: float, key: str) -> float:
    """Return ``value`` as a float; ValueError naming the config ``key`` unless it is finite and >= 0."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    return value


def _as_mask(masks: Tensor, mask_logits: Tensor) -> Tensor:
    """Bring ``masks`` to the shape and dtype of ``mask_logits`` (accepts ``(B, H, W)`` masks)."""
    if masks.dim() == mask_logits.dim() - 1:
        masks = masks.unsqueeze(1)
    if masks.shape != mask_logits.shape:
        raise ValueError(
            f"masks of shape {tuple(masks.shape)} do not match mask_logits of shape {tuple(mask_logits.shape)}"
        )
    return masks.to(dtype=mask_logits.dtype)


class SegmentationLoss(nn.Module):
    """Soft Dice + binary cross-entropy on mask logits (+ optional focal and Lovasz-hinge terms).

    ``loss = dice_weight * (1 - soft_dice) + bce_weight * BCEWithLogits + focal_weight * focal
    + lovasz_weight * lovasz_hinge``, with

    ``soft_dice = (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)``, ``p = sigmoid(mask_logits)``.

    The sums run over **all pixels of the whole batch** (batch-aggregated soft Dice), not per image and then
    averaged. BUSI has "normal" images whose true mask is empty: a per-image Dice on such an image is either
    ``smooth / (sum(p) + smooth)`` (very sensitive to ``smooth`` and to a handful of false-positive pixels) or
    undefined, and it would dominate the batch mean. Aggregating over the batch gives one well-conditioned ratio;
    a batch made only of empty masks still gets a Dice term that pushes ``p`` to 0, since ``smooth > 0``.
    The BCE term is the mean over all pixels.

    ``dice_reduction="lesion_images"`` instead computes the soft Dice of each image whose true mask is not
    empty and averages those (images with an empty mask get no Dice term; BCE, and the focal and Lovasz terms
    if on, still cover them); a batch without any lesion falls back to the batch-aggregated Dice. That is the
    loss-side twin of the headline metric (mean Dice over lesion images): a small lesion weighs as much as a
    large one, where the batch sum lets large lesions dominate.

    Args:
        dice_weight: weight of the Dice term (>= 0).
        bce_weight: weight of the BCE term (>= 0).
        smooth: additive smoothing in the Dice numerator and denominator (> 0 keeps empty batches defined).
        focal_weight: weight of the binary focal loss (Lin et al. 2017; mean over all pixels), 0 = off.
        focal_gamma: the focal loss's focusing exponent (>= 0; 0 is plain BCE).
        lovasz_weight: weight of the Lovasz hinge (Berman et al. 2018), a surrogate of the IoU, computed over the
            whole batch like the Dice term; 0 = off.
        dice_reduction: ``"batch"`` (sums over the whole batch, the default) or ``"lesion_images"`` (per image,
            averaged over the images with a non-empty mask).
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0,
                 focal_weight: float = 0.0, focal_gamma: float = 2.0, lovasz_weight: float = 0.0,
                 dice_reduction: str = "batch") -> None:
        super().__init__()
        if dice_reduction not in DICE_REDUCTIONS:
            raise ValueError(
                f"loss.segmentation.dice_reduction must be one of {', '.join(DICE_REDUCTIONS)}, got {dice_reduction!r}"
            )
        self.dice_reduction = dice_reduction
        self.dice_weight = _check_weight(dice_weight, "loss.segmentation.dice_weight")
        self.bce_weight = _check_weight(bce_weight, "loss.segmentation.bce_weight")
        self.smooth = _check_weight(smooth, "loss.segmentation.smooth")
        self.focal_weight = _check_weight(focal_weight, "loss.segmentation.focal_weight")
        self.focal_gamma = _check_weight(focal_gamma, "loss.segmentation.focal_gamma")
        self.lovasz_weight = _check_weight(lovasz_weight, "loss.segmentation.lovasz_weight")

    def dice_loss(self, mask_logits: Tensor, masks: Tensor) -> Tensor:
        """``1 - soft Dice``, aggregated over the batch or averaged over lesion images (scalar)."""
        masks = _as_mask(masks, mask_logits)
        probs = torch.sigmoid(mask_logits.float())
        target = masks.float()
        if self.dice_reduction == "lesion_images":
            dims = tuple(range(1, target.dim()))
            has_lesion = target.sum(dim=dims) > 0
            if has_lesion.any():
                p, t = probs[has_lesion], target[has_lesion]
                inter = (p * t).sum(dim=dims)
                den = p.sum(dim=dims) + t.sum(dim=dims)
                return (1.0 - (2.0 * inter + self.smooth) / (den + self.smooth).clamp_min(1e-7)).mean()
        intersection = (probs * target).sum()
        denominator = probs.sum() + target.sum()
        dice = (2.0 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-7)
        return 1.0 - dice

    def bce_loss(self, mask_logits: Tensor, masks: Tensor) -> Tensor:
        """Mean binary cross-entropy over all pixels (scalar)."""
        masks = _as_mask(masks, mask_logits)
        return F.binary_cross_entropy_with_logits(mask_logits.float(), masks.float())

    def forward(self, mask_logits: Tensor, masks: Tensor) -> Tensor:
        total = mask_logits.new_zeros((), dtype=torch.float32)
        if self.dice_weight:
            total = total + self.dice_weight * self.dice_loss(mask_logits, masks)
        if self.bce_weight:
            total = total + self.bce_weight * self.bce_loss(mask_logits, masks)
        if self.focal_weight:
            total = total + self.focal_weight * self.focal_loss(mask_logits, masks)
        if self.lovasz_weight:
            total = total + self.lovasz_weight * self.lovasz_loss(mask_logits, masks)
        return total

    def focal_loss(self, mask_logits: Tensor, masks: Tensor) -> Tensor:
        """Binary focal loss, ``mean((1 - p_t) ** gamma * BCE)`` over all pixels (scalar; smp's FocalLoss)."""
        from segmentation_models_pytorch.losses import FocalLoss

        masks = _as_mask(masks, mask_logits)
        return FocalLoss(mode="binary", gamma=self.focal_gamma)(mask_logits.float(), masks.float())

    def lovasz_loss(self, mask_logits: Tensor, masks: Tensor) -> Tensor:
        """Lovasz hinge over all pixels of the batch (scalar; smp's LovaszLoss, not per image)."""
        from segmentation_models_pytorch.losses import LovaszLoss

        masks = _as_mask(masks, mask_logits)
        return LovaszLoss(mode="binary", per_image=False)(mask_logits.float(), masks.float())

    def extra_repr(self) -> str:
        extra = ""
        if self.focal_weight:
            extra += f", focal_weight={self.focal_weight}, focal_gamma={self.focal_gamma}"
        if self.lovasz_weight:
            extra += f", lovasz_weight={self.lovasz_weight}"
        if self.dice_reduction != "batch":
            extra += f", dice_reduction={self.dice_reduction!r}"
        return f"dice_weight={self.dice_weight}, bce_weight={self.bce_weight}, smooth={self.smooth}{extra}"


class ClassificationLoss(nn.Module):
    """Loss of the classification head.

    * ``kind="mse"`` (the study's choice): mean squared error between ``softmax(class_logits)`` and
      ``one_hot(labels)``, averaged over the batch and the classes.
    * ``kind="ce"``: cross-entropy on the logits (:func:`torch.nn.functional.cross_entropy`).

    ``class_weights`` (one non-negative weight per class, or None): for ``"ce"`` it is passed as ``weight=`` to
    the cross-entropy; for ``"mse"`` each sample's loss (mean over classes) is weighted by the weight of its
    true class and the batch is reduced as ``sum(w_i * l_i) / sum(w_i)``, the same convention as weighted CE.
    With no weights, both are plain means.

    ``labels`` are class indices ``(B,)`` or class probabilities ``(B, C)`` (Mixup/CutMix targets,
    :mod:`busiseg.data.mixing`); with probabilities a sample's weight is ``sum_c p_c * class_weights[c]``, so
    one-hot probabilities give exactly the class-index loss.
    """

    def __init__(
        self,
        kind: str = "mse",
        num_classes: int = NUM_CLASSES,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        kind_norm = str(kind).lower()
        if kind_norm not in CLASSIFICATION_KINDS:
            raise ValueError(
                f"loss.classification.kind must be one of {', '.join(repr(k) for k in CLASSIFICATION_KINDS)}, "
                f"got {kind!r}"
            )
        self.kind = kind_norm
        self.num_classes = int(num_classes)
        if self.num_classes < 2:
            raise ValueError(f"loss.classification.num_classes must be >= 2, got {num_classes!r}")
        if class_weights is not None:
            # list(...) also accepts an omegaconf ListConfig, as Hydra passes it.
            weights = [_check_weight(w, "loss.classification.class_weights") for w in list(class_weights)]
            if len(weights) != self.num_classes:
                raise ValueError(
                    f"loss.classification.class_weights needs {self.num_classes} values (one per class), "
                    f"got {len(weights)}"
                )
            if sum(weights) <= 0:
                raise ValueError("loss.classification.class_weights must not all be 0")
            self.register_buffer("class_weights", torch.tensor(weights, dtype=torch.float32))
        else:
            self.register_buffer("class_weights", None)

    def forward(self, class_logits: Tensor, labels: Tensor) -> Tensor:
        if class_logits.dim() != 2 or class_logits.shape[1] != self.num_classes:
            raise ValueError(
                f"class_logits must have shape (B, {self.num_classes}), got {tuple(class_logits.shape)}"
            )
        logits = class_logits.float()
        if labels.dim() == 2:  # class probabilities (mixed batches, busiseg.data.mixing)
            if labels.shape != logits.shape:
                raise ValueError(f"class targets of shape {tuple(labels.shape)} do not match class_logits "
                                 f"of shape {tuple(logits.shape)}")
            target = labels.float()
        else:
            target = F.one_hot(labels.long().view(-1), num_classes=self.num_classes).float()
        if self.kind == "ce":  # for class indices: F.cross_entropy(logits, labels, weight=class_weights)
            per_sample = -(target * logits.log_softmax(dim=1)).sum(dim=1)
        else:
            per_sample = ((logits.softmax(dim=1) - target) ** 2).mean(dim=1)
        if self.class_weights is None:
            return per_sample.mean()
        w = target @ self.class_weights
        return (w * per_sample).sum() / w.sum().clamp_min(1e-12)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_classes={self.num_classes}"


class TaskWeighting(nn.Module):
    """How the segmentation and classification losses combine into the loss that is optimized.

    ``forward(seg_loss, cls_loss) -> (total, extras)``: ``total`` is the scalar to backpropagate, ``extras`` a
    dict of detached scalar tensors worth logging (e.g. the effective weights ``w_seg`` / ``w_cls``).
    """

    def forward(self, seg_loss: Tensor, cls_loss: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class FixedWeighting(TaskWeighting):
    """``total = w_seg * seg_loss + w_cls * cls_loss`` with constant weights (>= 0).

    A weight that is exactly 0 drops its term from the graph altogether (not multiplied by 0): the loss gets no
    gradient from that task at all, and a non-finite loss of a dropped task cannot poison the total.
    """

    def __init__(self, w_seg: float = 1.0, w_cls: float = 1.0) -> None:
        super().__init__()
        self.w_seg = _check_weight(w_seg, "loss.w_seg")
        self.w_cls = _check_weight(w_cls, "loss.w_cls")
        if self.w_seg == 0 and self.w_cls == 0:
            raise ValueError("loss.w_seg and loss.w_cls are both 0: nothing would be optimized")

    def forward(self, seg_loss: Tensor, cls_loss: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        terms = []
        if self.w_seg != 0:
            terms.append(seg_loss if self.w_seg == 1 else self.w_seg * seg_loss)
        if self.w_cls != 0:
            terms.append(cls_loss if self.w_cls == 1 else self.w_cls * cls_loss)
        total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        extras = {
            "w_seg": seg_loss.new_tensor(self.w_seg).detach(),
            "w_cls": seg_loss.new_tensor(self.w_cls).detach(),
        }
        return total, extras

    def extra_repr(self) -> str:
        return f"w_seg={self.w_seg}, w_cls={self.w_cls}"


class SegOnlyWeighting(FixedWeighting):
    """Ablation baseline: ``total = w_seg * seg_loss``, ``w_cls = 0`` exactly.

    The classification head still runs and its loss is still computed and logged, but it is not part of the
    optimized total, so the head's parameters get no gradient (their ``.grad`` stays None). Under DDP this means
    unused parameters: use ``strategy="ddp_find_unused_parameters_true"``.
    """

    def __init__(self, w_seg: float = 1.0) -> None:
        super().__init__(w_seg=w_seg, w_cls=0.0)


class UncertaintyWeighting(TaskWeighting):
    """Learned homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    With learnable ``s_seg = log_var_seg`` and ``s_cls = log_var_cls`` (``s = log sigma^2``, initialised to 0):

        ``total = 0.5 * exp(-s_seg) * L_seg + 0.5 * s_seg + 0.5 * exp(-s_cls) * L_cls + 0.5 * s_cls``

    i.e. ``L / (2 sigma^2) + log sigma`` per task, the form of the paper's Gaussian likelihood, parametrised by
    the log-variance for numerical stability. At init the total is ``0.5 * (L_seg + L_cls)``. The regulariser
    ``0.5 * s`` is what stops ``s`` from growing without bound; note the total can be negative.

    Extras (detached): ``w_seg = exp(-s_seg)`` and ``w_cls = exp(-s_cls)`` (the learned precisions ``1/sigma^2``;
    the factor that multiplies each loss in the total is ``0.5 * w``) and the raw ``log_var_seg`` /
    ``log_var_cls``.
    """

    def __init__(self, init_log_var_seg: float = 0.0, init_log_var_cls: float = 0.0) -> None:
        super().__init__()
        self.log_var_seg = nn.Parameter(torch.tensor(float(init_log_var_seg)))
        self.log_var_cls = nn.Parameter(torch.tensor(float(init_log_var_cls)))

    def forward(self, seg_loss: Tensor, cls_loss: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        s_seg = self.log_var_seg
        s_cls = self.log_var_cls
        total = (
            0.5 * torch.exp(-s_seg) * seg_loss
            + 0.5 * s_seg
            + 0.5 * torch.exp(-s_cls) * cls_loss
            + 0.5 * s_cls
        )
        extras = {
            "w_seg": torch.exp(-s_seg).detach(),
            "w_cls": torch.exp(-s_cls).detach(),
            "log_var_seg": s_seg.detach().clone(),
            "log_var_cls": s_cls.detach().clone(),
        }
        return total, extras


class MultiTaskLoss(nn.Module):
    """Segmentation loss + classification loss, combined by a :class:`TaskWeighting`.

    ``forward(mask_logits, class_logits, masks, labels)`` returns a dict with ``"loss"`` (the total, to
    backpropagate), ``"seg_loss"``, ``"cls_loss"`` (both always computed, also when a task's weight is 0) and the
    weighting's extras (``"w_seg"``, ``"w_cls"``, ...). All values are scalar tensors.

    With ``aux_mask_logits`` (the deep-supervision outputs of ``MultiTaskUnet(deep_supervision=k)``),
    ``"seg_loss"`` is the weighted sum of :meth:`deep_supervision_loss` (what is optimized) and
    ``"seg_loss_final"`` the final mask's own loss (detached, for logging).
    """

    RESERVED_KEYS: tuple[str, ...] = ("loss", "seg_loss", "cls_loss")

    def __init__(
        self,
        segmentation: SegmentationLoss,
        classification: ClassificationLoss,
        weighting: TaskWeighting,
    ) -> None:
        super().__init__()
        self.segmentation = segmentation
        self.classification = classification
        self.weighting = weighting

    def forward(self, mask_logits: Tensor, class_logits: Tensor, masks: Tensor, labels: Tensor,
                aux_mask_logits: Sequence[Tensor] = ()) -> dict[str, Tensor]:
        seg_loss = self.segmentation(mask_logits, masks)
        deep = {}
        if len(aux_mask_logits):
            deep["seg_loss_final"] = seg_loss.detach()
            seg_loss = self.deep_supervision_loss(seg_loss, aux_mask_logits, masks)
        cls_loss = self.classification(class_logits, labels)
        total, extras = self.weighting(seg_loss, cls_loss)
        clash = set(extras) & set(self.RESERVED_KEYS)
        if clash:
            raise KeyError(f"weighting extras must not use the reserved keys {sorted(clash)}")
        return {"loss": total, "seg_loss": seg_loss, "cls_loss": cls_loss, **deep, **extras}

    def deep_supervision_loss(self, final_loss: Tensor, aux_mask_logits: Sequence[Tensor], masks: Tensor) -> Tensor:
        """Deep supervision as in nnU-Net: ``sum_k w_k * L_seg(output_k)`` with ``w_k = 2 ** -k`` normalised to
        sum 1, where output 0 is the final mask and output k the k-th auxiliary one (coarser each time). An
        auxiliary output is upsampled (bilinear, on the logits) to the mask's size, so every term compares with
        the exact full-resolution mask."""
        size = masks.shape[-2:]
        weights = [2.0 ** -k for k in range(len(aux_mask_logits) + 1)]
        norm = sum(weights)
        total = final_loss * (weights[0] / norm)
        for w, logits in zip(weights[1:], aux_mask_logits):
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
            total = total + (w / norm) * self.segmentation(logits, masks)
        return total

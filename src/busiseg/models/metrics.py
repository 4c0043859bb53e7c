"""Metrics of the multi-task network, built on torchmetrics.

Inputs (the caller applies the activations):

* segmentation collection and :class:`PerImageDice`: ``preds`` = mask **probabilities** ``sigmoid(mask_logits)``,
  float ``(B, 1, H, W)`` in ``[0, 1]``; ``target`` = true mask ``(B, 1, H, W)`` with values in ``{0, 1}``
  (integer preferred; a float mask holding only 0 and 1 is accepted). Threshold 0.5.
* classification collection and confusion matrix: ``preds`` = class **probabilities** ``softmax(class_logits)``,
  float ``(B, C)``; ``target`` = labels, long ``(B,)``.

Every value in ``compute()`` of both collections is a scalar tensor, so ``LightningModule.log_dict`` accepts it.

Caveats of torchmetrics: a torchmetrics binary metric given float ``preds`` outside ``[0, 1]`` silently applies a
sigmoid first, so logits would "work" too, but pass probabilities. ``MulticlassAUROC`` returns 0 for a class
absent from the accumulated targets (with a warning), which drags the macro AUROC down on tiny splits.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryJaccardIndex,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassSpecificity,
)
from torchmetrics.wrappers import ClasswiseWrapper

from busiseg.data.labels import CLASS_NAMES, NUM_CLASSES

__all__ = [
    "PerImageDice",
    "classification_metrics",
    "confusion_matrix_metric",
    "segmentation_metrics",
]

SEG_THRESHOLD = 0.5

# _COMPUTE_GROUPS_NOTE: both collections are built with ``compute_groups=False``.
# With compute groups (torchmetrics 1.9.0), a ``ClasswiseWrapper`` that shares its state with the macro metrics keeps
# returning the value cached by its inner metric when ``compute()`` is called between updates (stale per-class
# recall), and its inner metric warns "compute called before update" every epoch after a reset. Older torchmetrics
# versions (which pyproject.toml still allows) had similar caching bugs for ordinary grouped metrics (torchmetrics
# issues #2206, #2570). The saving would be a few extra count updates per batch; correctness wins.


class PerImageDice(Metric):
    """Mean over images of the Dice of each image's thresholded mask.

    Per image: ``dice = 2 |P & T| / (|P| + |T|)`` with ``P = preds > threshold`` (strict, as torchmetrics
    thresholds) and ``T = target > 0``; an image whose true and predicted masks are both empty scores 1, one
    empty and the other not scores 0 (that is what the formula gives anyway). Unlike the pixel-aggregated Dice
    (``BinaryF1Score`` over all pixels), every image counts equally, large lesions and "normal" images (empty
    masks) alike.

    ``preds``: probabilities ``(B, 1, H, W)`` or ``(B, H, W)`` (or already binary); ``target`` of the same shape.
    States ``sum`` and ``count`` are sum-reduced, so the metric syncs under DDP.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    sum: Tensor
    count: Tensor

    def __init__(self, threshold: float = SEG_THRESHOLD, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.add_state("sum", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(
                f"preds of shape {tuple(preds.shape)} and target of shape {tuple(target.shape)} must match"
            )
        if preds.dim() < 2:
            raise ValueError(f"expected a batch of masks (B, ...), got shape {tuple(preds.shape)}")
        batch = preds.shape[0]
        if preds.is_floating_point():
            # Same conventions as torchmetrics' binary metrics, so that ``dice_per_image`` and ``dice`` agree:
            # a tensor with values outside [0, 1] is taken for logits (sigmoid), and positive means > threshold.
            out_of_range = (preds.min() < 0) | (preds.max() > 1)
            preds = torch.where(out_of_range, preds.sigmoid(), preds)
            pred_bin = preds.reshape(batch, -1) > self.threshold
        else:
            pred_bin = preds.reshape(batch, -1) > 0
        true_bin = target.reshape(batch, -1) > 0
        # float32 states: float64 is not available on every accelerator (MPS).
        intersection = (pred_bin & true_bin).sum(dim=1).to(torch.float32)
        size_sum = (pred_bin.sum(dim=1) + true_bin.sum(dim=1)).to(torch.float32)
        dice = torch.where(
            size_sum > 0,
            2.0 * intersection / size_sum.clamp_min(1.0),
            torch.ones_like(size_sum),
        )
        self.sum += dice.sum()
        self.count += batch

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), device=self.sum.device)
        return self.sum / self.count


def segmentation_metrics(prefix: str, threshold: float = SEG_THRESHOLD) -> MetricCollection:
    """Segmentation metrics, keys ``f"{prefix}{name}"``.

    ``dice`` (pixel-aggregated over everything seen, = ``BinaryF1Score``), ``iou`` (``BinaryJaccardIndex``),
    ``sensitivity`` (``BinaryRecall``), ``specificity`` (``BinarySpecificity``), ``precision``
    (``BinaryPrecision``) and ``dice_per_image`` (:class:`PerImageDice`).

    ``update(preds, target)``: mask probabilities ``(B, 1, H, W)`` and the true mask (``{0, 1}``), threshold 0.5.
    """
    return MetricCollection(
        {
            "dice": BinaryF1Score(threshold=threshold),
            "iou": BinaryJaccardIndex(threshold=threshold),
            "sensitivity": BinaryRecall(threshold=threshold),
            "specificity": BinarySpecificity(threshold=threshold),
            "precision": BinaryPrecision(threshold=threshold),
            "dice_per_image": PerImageDice(threshold=threshold),
        },
        prefix=prefix,
        compute_groups=False,  # see the _COMPUTE_GROUPS_NOTE comment above
    )


def classification_metrics(prefix: str, num_classes: int = NUM_CLASSES) -> MetricCollection:
    """Classification metrics, keys ``f"{prefix}{name}"``.

    ``accuracy`` (micro), ``precision_macro`` / ``recall_macro`` / ``f1_macro`` / ``specificity_macro`` (macro over
    classes), ``auroc_macro`` (macro one-vs-rest ``MulticlassAUROC``); the ``_macro`` suffix keeps these apart from the
    segmentation metrics of the same name and the per-class recall as flat scalars ``recall_<class name>``
    (``recall_normal``, ``recall_benign``, ``recall_malignant`` for the BUSI classes; ``recall_<index>`` when
    ``num_classes`` differs from the package's classes).

    ``update(preds, target)``: class probabilities ``(B, C)`` (softmax) and labels ``(B,)``.
    """
    num_classes = int(num_classes)
    if num_classes == NUM_CLASSES:
        names = list(CLASS_NAMES)
    else:
        names = [str(i) for i in range(num_classes)]
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "precision_macro": MulticlassPrecision(num_classes=num_classes, average="macro"),
            "recall_macro": MulticlassRecall(num_classes=num_classes, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes=num_classes, average="macro"),
            "specificity_macro": MulticlassSpecificity(num_classes=num_classes, average="macro"),
            "auroc_macro": MulticlassAUROC(num_classes=num_classes, average="macro"),
            # A dict-valued metric: MetricCollection flattens it into recall_normal, recall_benign, ...
            "recall_per_class": ClasswiseWrapper(
                MulticlassRecall(num_classes=num_classes, average=None), labels=names, prefix="recall_"
            ),
        },
        prefix=prefix,
        compute_groups=False,  # see the _COMPUTE_GROUPS_NOTE comment above
    )


def confusion_matrix_metric(num_classes: int = NUM_CLASSES) -> MulticlassConfusionMatrix:
    """Un-normalised ``(C, C)`` confusion matrix, rows = true class, columns = predicted class.

    Kept out of the collections because its value is a matrix, not a scalar (log it as a figure or text).
    ``update(preds, target)`` with class probabilities ``(B, C)`` or predicted labels ``(B,)``, and labels ``(B,)``.
    """
    return MulticlassConfusionMatrix(num_classes=int(num_classes))

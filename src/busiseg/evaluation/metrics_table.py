"""The numbers of an evaluation, from plain numpy arrays (no torch, no files).

Segmentation: :func:`score_mask` reduces one (true, predicted) boolean mask pair to its
pixel counts and HD95; :func:`segmentation_summary` aggregates many of them overall and
per class. Classification: :func:`classification_summary` from class probabilities and
labels. The definitions (empty masks, zero divisions, what is averaged over what) are
written out in docs/evaluation.md; the rules in short:

* per-image Dice / IoU of an image whose true and predicted masks are both empty is 1;
* ``dice``, ``iou``, ``sensitivity``, ``specificity``, ``precision`` sum the pixel counts
  of the group's images first (as the training step does); ``*_per_image`` average the
  per-image values over the images where they are defined;
* HD95 only on lesion images (true mask not empty); an empty prediction there scores
  the image diagonal (the largest distance possible), and is counted;
* classification: zero divisions give 0 (as torchmetrics and scikit-learn); macro
  averages run over the classes present in the true or predicted labels; AUROC is
  one-vs-rest, undefined (``None``) for a class without positives or negatives.

Values that are undefined are ``None`` (``null`` in JSON), never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from busiseg.data.labels import CLASS_NAMES

__all__ = [
    "ECE_BINS",
    "MaskScore",
    "MaskScores",
    "auroc",
    "boundary",
    "calibration_bins",
    "classification_report_text",
    "classification_summary",
    "confusion_matrix",
    "expected_calibration_error",
    "hd95",
    "roc_curve",
    "score_mask",
    "segmentation_summary",
]

ECE_BINS = 15  # torchmetrics' default for its calibration error
HD_PERCENTILE = 95.0
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _ratio0(num: float, den: float) -> float:
    """Zero division gives 0 (the torchmetrics / scikit-learn convention for classification)."""
    return float(num) / float(den) if den > 0 else 0.0


def _mean(values: np.ndarray) -> float | None:
    """Mean of the finite values, None when there is none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


# --------------------------------------------------------------------------- one mask pair
def boundary(mask: np.ndarray) -> np.ndarray:
    """Inner boundary of a boolean mask: its pixels with a 4-neighbour outside it (the
    image border counts as outside), i.e. ``mask & ~erode(mask, cross)``."""
    m = np.asarray(mask, dtype=np.uint8)
    eroded = cv2.erode(m, _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return (m > 0) & (eroded == 0)


def _directed_distances(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels) from every True pixel of ``src`` to the nearest True pixel of ``dst``."""
    # distanceTransform measures the distance to the nearest zero; DIST_MASK_PRECISE is exact for L2.
    field = cv2.distanceTransform((~dst).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return field[src].astype(np.float64)


def hd95(true: np.ndarray, pred: np.ndarray, percentile: float = HD_PERCENTILE) -> float:
    """95th-percentile symmetric Hausdorff distance between the mask boundaries, in pixels.

    ``max(P95(d(pred boundary -> true boundary)), P95(d(true boundary -> pred boundary)))``
    (the MONAI convention; percentiles interpolate linearly, as ``np.percentile``).
    NaN when the true mask is empty (not a lesion image); the image diagonal when the
    true mask is not empty but the prediction is (a missed lesion gets the worst score).
    """
    true = np.asarray(true, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if true.shape != pred.shape:
        raise ValueError(f"true mask {true.shape} and predicted mask {pred.shape} differ in shape")
    if not true.any():
        return math.nan
    if not pred.any():
        return float(math.hypot(*true.shape))
    bt, bp = boundary(true), boundary(pred)
    return float(max(np.percentile(_directed_distances(bp, bt), percentile),
                     np.percentile(_directed_distances(bt, bp), percentile)))


@dataclass(frozen=True)
class MaskScore:
    """One image's predicted mask against its true mask."""

    tp: int
    fp: int
    fn: int
    tn: int
    hd95: float  # NaN when the true mask is empty

    @property
    def true_area(self) -> int:
        return self.tp + self.fn

    @property
    def pred_area(self) -> int:
        return self.tp + self.fp

    @property
    def dice(self) -> float:
        den = 2 * self.tp + self.fp + self.fn
        return 1.0 if den == 0 else 2.0 * self.tp / den

    @property
    def iou(self) -> float:
        den = self.tp + self.fp + self.fn
        return 1.0 if den == 0 else self.tp / den


def score_mask(true: np.ndarray, pred: np.ndarray, with_hd95: bool = True) -> MaskScore:
    """Pixel counts (TP, FP, FN, TN) and HD95 of boolean masks of the same shape."""
    true = np.asarray(true, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if true.shape != pred.shape:
        raise ValueError(f"true mask {true.shape} and predicted mask {pred.shape} differ in shape")
    tp = int(np.count_nonzero(true & pred))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(true)) - tp
    tn = true.size - tp - fp - fn
    return MaskScore(tp, fp, fn, tn, hd95(true, pred) if with_hd95 else math.nan)


class MaskScores:
    """Many MaskScores as arrays (one entry per image)."""

    def __init__(self, scores: Sequence[MaskScore]):
        self.tp = np.array([s.tp for s in scores], dtype=np.int64)
        self.fp = np.array([s.fp for s in scores], dtype=np.int64)
        self.fn = np.array([s.fn for s in scores], dtype=np.int64)
        self.tn = np.array([s.tn for s in scores], dtype=np.int64)
        self.hd95 = np.array([s.hd95 for s in scores], dtype=np.float64)

    def __len__(self) -> int:
        return int(self.tp.size)

    def subset(self, keep: np.ndarray) -> "MaskScores":
        out = MaskScores([])
        for name in ("tp", "fp", "fn", "tn", "hd95"):
            setattr(out, name, getattr(self, name)[keep])
        return out

    @property
    def true_area(self) -> np.ndarray:
        return self.tp + self.fn

    @property
    def pred_area(self) -> np.ndarray:
        return self.tp + self.fp

    @property
    def dice(self) -> np.ndarray:
        den = 2 * self.tp + self.fp + self.fn
        return np.where(den > 0, 2.0 * self.tp / np.maximum(den, 1), 1.0)

    @property
    def iou(self) -> np.ndarray:
        den = self.tp + self.fp + self.fn
        return np.where(den > 0, self.tp / np.maximum(den, 1), 1.0)

    def _per_image(self, num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    @property
    def sensitivity(self) -> np.ndarray:
        """NaN where the true mask is empty."""
        return self._per_image(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> np.ndarray:
        """NaN where the whole image is lesion."""
        return self._per_image(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> np.ndarray:
        """NaN where the prediction is empty."""
        return self._per_image(self.tp, self.tp + self.fp)


def _segmentation_group(s: MaskScores) -> dict[str, float | int | None]:
    tp, fp, fn, tn = (int(getattr(s, k).sum()) for k in ("tp", "fp", "fn", "tn"))
    lesion = s.true_area > 0
    hd = s.hd95[lesion]
    return {
        "images": len(s),
        "lesion_images": int(lesion.sum()),
        # pixel counts summed over the group's images first
        "dice": (1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)) if len(s) else None,
        "iou": (1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)) if len(s) else None,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        # mean over images of the per-image value, where defined
        "dice_per_image": _mean(s.dice),
        "iou_per_image": _mean(s.iou),
        "sensitivity_per_image": _mean(s.sensitivity),
        "specificity_per_image": _mean(s.specificity),
        "precision_per_image": _mean(s.precision),
        # lesion images only
        "hd95": _mean(hd),
        "hd95_median": float(np.median(hd)) if hd.size else None,
        "empty_predictions_on_lesion_images": int((s.pred_area[lesion] == 0).sum()),
        "empty_predictions_on_normal_images": int((s.pred_area[~lesion] == 0).sum()),
    }


def segmentation_summary(scores: MaskScores, labels: np.ndarray,
                         class_names: Sequence[str] = CLASS_NAMES) -> dict[str, dict]:
    """``{"overall": {...}, "<class>": {...}}``, each with the keys of the module docstring."""
    labels = np.asarray(labels)
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels for {len(scores)} mask scores")
    out = {"overall": _segmentation_group(scores)}
    for k, name in enumerate(class_names):
        out[name] = _segmentation_group(scores.subset(labels == k))
    return out


# --------------------------------------------------------------------------- classification
def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return cm


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of one-vs-rest scores, one point per distinct score (ties
    form one step), starting at (0, 0). Raises ValueError without positives or negatives."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs both positives and negatives")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = last_of_tie + 1 - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def auroc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (trapezoids; a tie counts half), None without positives or negatives.

    Summed in whole counts (twice the ranked-right pairs) and divided once at the end, so a perfect
    ranking is exactly 1.0 and not 0.9999999999999999 from adding up rates."""
    positive = np.asarray(positive, dtype=bool)
    try:
        fpr, tpr, _ = roc_curve(positive, scores)
    except ValueError:
        return None
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    fps = np.rint(fpr * n_neg).astype(np.int64)
    tps = np.rint(tpr * n_pos).astype(np.int64)
    twice_pairs = int(np.sum(np.diff(fps) * (tps[1:] + tps[:-1])))
    return twice_pairs / (2 * n_pos * n_neg)


def calibration_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Top-label confidence in ``n_bins`` equal-width bins ``[i/n, (i+1)/n)`` (the last one
    closed): per bin the count, mean confidence and accuracy (NaN where empty)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    idx = np.clip((conf * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count, "confidence": mean_conf,
            "accuracy": accuracy}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float | None:
    """``sum_b (n_b / N) |accuracy_b - mean confidence_b|`` over the bins of :func:`calibration_bins`."""
    if len(labels) == 0:
        return None
    bins = calibration_bins(probs, labels, n_bins)
    used = bins["count"] > 0
    weights = bins["count"][used] / bins["count"].sum()
    return float(np.sum(weights * np.abs(bins["accuracy"][used] - bins["confidence"][used])))


def classification_summary(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str] = CLASS_NAMES,
                           ece_bins: int = ECE_BINS) -> dict:
    """Accuracy, per-class / macro / weighted precision, recall, F1, specificity, AUROC,
    ECE and the confusion matrix of class probabilities ``(N, C)`` against labels ``(N,)``."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(class_names)
    if probs.ndim != 2 or probs.shape != (labels.size, num_classes):
        raise ValueError(f"probs must be (N, {num_classes}) for {labels.size} labels, got {probs.shape}")
    n = labels.size
    predicted = probs.argmax(axis=1)
    cm = confusion_matrix(labels, predicted, num_classes)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = n - tp - fp - fn
    support = tp + fn
    per_class: dict[str, dict] = {}
    for k, name in enumerate(class_names):
        per_class[name] = {
            "precision": _ratio0(tp[k], tp[k] + fp[k]),
            "recall": _ratio0(tp[k], tp[k] + fn[k]),
            "f1": _ratio0(2 * tp[k], 2 * tp[k] + fp[k] + fn[k]),
            "specificity": _ratio0(tn[k], tn[k] + fp[k]),
            "auroc": auroc(labels == k, probs[:, k]),
            "support": int(support[k]),
            "predicted": int(tp[k] + fp[k]),
        }
    present = [name for k, name in enumerate(class_names) if tp[k] + fp[k] + fn[k] > 0]
    keys = ("precision", "recall", "f1", "specificity")
    macro = {key: (float(np.mean([per_class[c][key] for c in present])) if present else None) for key in keys}
    aurocs = [per_class[c]["auroc"] for c in class_names if per_class[c]["auroc"] is not None]
    macro["auroc"] = float(np.mean(aurocs)) if aurocs else None
    weighted = {
        key: (float(sum(per_class[c][key] * per_class[c]["support"] for c in class_names) / n) if n else None)
        for key in keys
    }
    return {
        "images": int(n),
        "accuracy": _ratio(int(tp.sum()), n),
        "per_class": per_class,
        "macro": macro,
        "weighted": weighted,
        "ece": expected_calibration_error(probs, labels, ece_bins),
        "ece_bins": int(ece_bins),
        "brier": float(np.mean(np.sum((probs - np.eye(num_classes)[labels]) ** 2, axis=1))) if n else None,
        "confusion_matrix": cm.tolist(),
    }


def classification_report_text(summary: dict, class_names: Sequence[str] = CLASS_NAMES, digits: int = 3) -> str:
    """scikit-learn's ``classification_report`` layout (precision / recall / f1-score /
    support, then accuracy, macro and weighted averages), followed by specificity, AUROC,
    calibration and the confusion matrix."""
    headers = ["precision", "recall", "f1-score", "support"]
    width = max(max(len(c) for c in class_names), len("weighted avg"), digits)
    head_fmt = "{:>{width}s} " + " {:>9}" * len(headers)
    row_fmt = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"

    def fmt(v):
        return float("nan") if v is None else v

    per = summary["per_class"]
    n = summary["images"]
    text = head_fmt.format("", *headers, width=width) + "\n\n"
    for c in class_names:
        text += row_fmt.format(c, per[c]["precision"], per[c]["recall"], per[c]["f1"], per[c]["support"],
                               width=width, digits=digits)
    text += "\n"
    text += ("{:>{width}s} " + " {:>9}" * 2 + " {:>9.{digits}f} {:>9}\n").format(
        "accuracy", "", "", fmt(summary["accuracy"]), n, width=width, digits=digits)
    for label, key in (("macro avg", "macro"), ("weighted avg", "weighted")):
        avg = summary[key]
        text += row_fmt.format(label, fmt(avg["precision"]), fmt(avg["recall"]), fmt(avg["f1"]), n,
                               width=width, digits=digits)

    text += "\n" + ("{:>{width}s} " + " {:>11}" * 2 + "\n").format("", "specificity", "AUROC", width=width)
    for c in class_names:
        auc = "n/a" if per[c]["auroc"] is None else f"{per[c]['auroc']:.{digits}f}"
        text += ("{:>{width}s} " + " {:>11.{digits}f} {:>11}\n").format(c, per[c]["specificity"], auc,
                                                                         width=width, digits=digits)
    macro_auc = "n/a" if summary["macro"]["auroc"] is None else f"{summary['macro']['auroc']:.{digits}f}"
    text += ("{:>{width}s} " + " {:>11.{digits}f} {:>11}\n").format(
        "macro avg", fmt(summary["macro"]["specificity"]), macro_auc, width=width, digits=digits)
    ece = "n/a" if summary["ece"] is None else f"{summary['ece']:.{digits}f}"
    text += f"\nexpected calibration error (top-label, {summary['ece_bins']} bins): {ece}\n"

    text += "\nconfusion matrix (rows = true class, columns = predicted class)\n"
    cell = max(9, max(len(c) for c in class_names) + 1)
    text += " " * width + "".join(f"{c:>{cell}}" for c in class_names) + "\n"
    for c, row in zip(class_names, summary["confusion_matrix"]):
        text += f"{c:>{width}}" + "".join(f"{v:>{cell}d}" for v in row) + "\n"
    text += ("\nmacro avg: mean over the classes present in the true or predicted labels; "
             "weighted avg: weighted by support.\n")
    return text

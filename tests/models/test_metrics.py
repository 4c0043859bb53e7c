"""Metrics: hand-computed values on tiny examples."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from busiseg.data.labels import CLASS_NAMES
from busiseg.models.metrics import (
    PerImageDice,
    classification_metrics,
    confusion_matrix_metric,
    segmentation_metrics,
)


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# Two 2x2 images; threshold 0.5.
#   image 1: probs [[0.9, 0.2], [0.6, 0.4]] -> pred [[1, 0], [1, 0]]; true [[1, 1], [0, 0]]
#            TP = 1 (top-left), FP = 1 (bottom-left), FN = 1 (top-right), TN = 1 (bottom-right)
#   image 2: probs [[0.1, 0.7], [0.55, 0.8]] -> pred [[0, 1], [1, 1]]; true [[0, 1], [0, 1]]
#            TP = 2, FP = 1 (bottom-left), FN = 0, TN = 1 (top-left)
# All pixels: TP = 3, FP = 2, FN = 1, TN = 2
#   dice        = 2TP / (2TP + FP + FN) = 6 / 9 = 2/3
#   iou         = TP / (TP + FP + FN)   = 3 / 6 = 1/2
#   sensitivity = TP / (TP + FN)        = 3 / 4
#   specificity = TN / (TN + FP)        = 2 / 4 = 1/2
#   precision   = TP / (TP + FP)        = 3 / 5
# Per image Dice: image 1 = 2*1 / (2 + 2) = 1/2, image 2 = 2*2 / (3 + 2) = 4/5 -> mean 13/20.
SEG_PROBS = _t([[[[0.9, 0.2], [0.6, 0.4]]], [[[0.1, 0.7], [0.55, 0.8]]]])
SEG_TRUE = torch.tensor([[[[1, 1], [0, 0]]], [[[0, 1], [0, 1]]]])
SEG_EXPECTED = {
    "dice": 2 / 3,
    "iou": 1 / 2,
    "sensitivity": 3 / 4,
    "specificity": 1 / 2,
    "precision": 3 / 5,
    "dice_per_image": 13 / 20,
}

# Six samples, labels (normal, normal, benign, benign, malignant, malignant); argmax of the probabilities:
#   s0 normal ok, s1 -> benign (wrong), s2 benign ok, s3 benign ok, s4 malignant ok, s5 -> normal (wrong).
# accuracy = 4/6 = 2/3
# recall:      normal 1/2, benign 2/2 = 1, malignant 1/2              -> macro 2/3
# precision:   normal 1/2 (s0, s5), benign 2/3 (s1, s2, s3), malig. 1/1 -> macro (1/2 + 2/3 + 1)/3 = 13/18
# f1:          normal 1/2, benign 2*(2/3)*1/(5/3) = 4/5, malignant 2*1*(1/2)/(3/2) = 2/3
#                                                                     -> macro (1/2 + 4/5 + 2/3)/3 = 59/90
# specificity: normal TN 3 / (3 + FP 1) = 3/4, benign 3/4, malignant 4/4 -> macro 5/6
# auroc (one-vs-rest, fraction of (positive, negative) pairs ranked right):
#   normal:    positives 0.7, 0.3 vs negatives 0.1, 0.2, 0.1, 0.5 -> (4 + 3)/8 = 7/8
#   benign:    positives 0.8, 0.5 vs negatives 0.2, 0.6, 0.2, 0.1 -> (4 + 3)/8 = 7/8
#   malignant: positives 0.7, 0.4 vs negatives 0.1, 0.1, 0.1, 0.3 -> 8/8 = 1   -> macro 11/12
CLS_PROBS = _t(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.2, 0.7],
        [0.5, 0.1, 0.4],
    ]
)
CLS_LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
CLS_EXPECTED = {
    "accuracy": 2 / 3,
    "recall_macro": 2 / 3,
    "precision_macro": 13 / 18,
    "f1_macro": 59 / 90,
    "specificity_macro": 5 / 6,
    "auroc_macro": 11 / 12,
    "recall_normal": 1 / 2,
    "recall_benign": 1.0,
    "recall_malignant": 1 / 2,
}


def _assert_values(result: dict, expected: dict, prefix: str) -> None:
    assert set(result) == {prefix + k for k in expected}
    for key, value in expected.items():
        got = result[prefix + key]
        assert got.dim() == 0, f"{key} is not a scalar: {got}"
        assert_close(got, _t(value), msg=lambda m, key=key: f"{key}: {m}")


# ---------------------------------------------------------------------------------------------- segmentation


def test_segmentation_metrics_hand_computed():
    metrics = segmentation_metrics("val/")
    metrics.update(SEG_PROBS, SEG_TRUE)
    _assert_values(metrics.compute(), SEG_EXPECTED, "val/")


def test_segmentation_metrics_accumulate_across_batches_and_accept_float_targets():
    # One image per update, the float mask the data pipeline produces: same totals as one batch.
    metrics = segmentation_metrics("train/")
    for i in range(2):
        metrics.update(SEG_PROBS[i : i + 1], SEG_TRUE[i : i + 1].float())
    _assert_values(metrics.compute(), SEG_EXPECTED, "train/")


def _fresh_compute(factory, batches):
    metrics = factory()
    for preds, target in batches:
        metrics.update(preds, target)
    return metrics.compute()


def _check_interleaved_compute(factory, batches):
    # compute() after every update (e.g. logging mid-epoch) and across a reset must equal a fresh metric fed the
    # same batches: no stale cached values (torchmetrics compute-group caching bugs).
    metrics = factory()
    for _epoch in range(2):
        for n in range(1, len(batches) + 1):
            metrics.update(*batches[n - 1])
            got, expected = metrics.compute(), _fresh_compute(factory, batches[:n])
            assert got.keys() == expected.keys()
            for key in got:
                assert_close(got[key], expected[key], msg=lambda m, key=key: f"{key}: {m}")
        metrics.reset()


def test_segmentation_metrics_interleaved_compute_and_reset():
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(3, 1, 6, 6, generator=g), (torch.rand(3, 1, 6, 6, generator=g) > 0.7).long()) for _ in range(3)
    ]
    _check_interleaved_compute(lambda: segmentation_metrics("val/"), batches)


def test_classification_metrics_interleaved_compute_and_reset():
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(8, 3, generator=g).softmax(1), torch.arange(8) % 3) for _ in range(3)
    ]
    _check_interleaved_compute(lambda: classification_metrics("val/"), batches)


def test_per_image_dice_empty_cases():
    empty = torch.zeros(1, 1, 3, 3)
    lesion = torch.zeros(1, 1, 3, 3)
    lesion[0, 0, 1, 1] = 1

    both_empty = PerImageDice()
    both_empty.update(empty + 0.1, empty.long())  # probs below threshold -> empty prediction, empty truth
    assert_close(both_empty.compute(), _t(1.0))

    missed = PerImageDice()
    missed.update(empty, lesion.long())  # empty prediction, lesion present
    assert_close(missed.compute(), _t(0.0))

    false_alarm = PerImageDice()
    false_alarm.update(lesion * 0.9, empty.long())  # lesion predicted on a normal image
    assert_close(false_alarm.compute(), _t(0.0))

    # All three together: (1 + 0 + 0) / 3.
    together = PerImageDice()
    together.update(torch.cat([empty + 0.1, empty, lesion * 0.9]), torch.cat([empty, lesion, empty]).long())
    assert_close(together.compute(), _t(1 / 3))


def test_per_image_dice_partial_overlap():
    # pred = 3 pixels, truth = 2 pixels, overlap 1 -> 2*1 / (3 + 2) = 2/5.
    probs = _t([[[[0.8, 0.9], [0.7, 0.0]]]])
    true = torch.tensor([[[[1, 0], [0, 1]]]])
    metric = PerImageDice()
    metric.update(probs, true)
    assert_close(metric.compute(), _t(2 / 5))
    # Threshold is strict (> 0.5), like torchmetrics' binary metrics: 0.5 itself is background.
    metric = PerImageDice()
    metric.update(_t([[[[0.5, 0.0]]]]), torch.tensor([[[[1, 0]]]]))
    assert_close(metric.compute(), _t(0.0))


def test_per_image_dice_accepts_masks_without_channel_dim():
    metric = PerImageDice()
    metric.update(SEG_PROBS.squeeze(1), SEG_TRUE.squeeze(1))
    assert_close(metric.compute(), _t(13 / 20))


def test_per_image_dice_states_merge_like_ddp():
    # Two "processes" see one image each; sum-reduced states merge into the mean over both images.
    rank0, rank1 = PerImageDice(), PerImageDice()
    rank0.update(SEG_PROBS[:1], SEG_TRUE[:1])
    rank1.update(SEG_PROBS[1:], SEG_TRUE[1:])
    rank0.merge_state(rank1)
    assert_close(rank0.compute(), _t(13 / 20))
    assert rank0.count.item() == 2


# -------------------------------------------------------------------------------------------- classification


def test_classification_metrics_hand_computed():
    metrics = classification_metrics("val/")
    metrics.update(CLS_PROBS, CLS_LABELS)
    _assert_values(metrics.compute(), CLS_EXPECTED, "val/")


# The first half-batch has no malignant sample: torchmetrics warns about it, expectedly.
@pytest.mark.filterwarnings("ignore:No positive samples in targets")
def test_classification_metrics_forward_and_accumulate_in_two_batches():
    metrics = classification_metrics("test/")
    step = metrics(CLS_PROBS[:3], CLS_LABELS[:3])  # forward gives the batch values, flat and scalar too
    assert all(v.dim() == 0 for v in step.values())
    assert {"test/recall_normal", "test/recall_benign", "test/recall_malignant"} <= set(step)
    metrics(CLS_PROBS[3:], CLS_LABELS[3:])
    _assert_values(metrics.compute(), CLS_EXPECTED, "test/")


def test_auroc_is_one_on_separable_probabilities():
    probs = _t(
        [
            [0.8, 0.1, 0.1],
            [0.7, 0.2, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.1, 0.8],
            [0.2, 0.1, 0.7],
        ]
    )
    metrics = classification_metrics("")
    metrics.update(probs, CLS_LABELS)
    result = metrics.compute()
    assert_close(result["auroc_macro"], _t(1.0))
    assert_close(result["accuracy"], _t(1.0))


def test_per_class_recall_keys_follow_class_names():
    metrics = classification_metrics("x/")
    metrics.update(CLS_PROBS, CLS_LABELS)
    keys = set(metrics.compute())
    assert {f"x/recall_{name}" for name in CLASS_NAMES} <= keys


def test_confusion_matrix_hand_computed():
    # rows = true class, columns = predicted (see the 6-sample example above)
    cm = confusion_matrix_metric()
    cm.update(CLS_PROBS, CLS_LABELS)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(cm.compute(), expected)

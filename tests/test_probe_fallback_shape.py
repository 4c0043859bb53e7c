"""scripts/probe_fallback_mask.py (e75) and scripts/probe_shape_features.py (e76) on hand-made scans."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from busiseg.models.mask_refiner import MaskRefiner, RefinerSettings
from tests.conftest import load_script


fallback = load_script("probe_fallback_mask")
shape = load_script("probe_shape_features")
SMALL = RefinerSettings(size=32, decoder_channels=(32, 16, 16, 8, 8), test_margins=(1.5,))


class Recording(MaskRefiner):
    """A refiner that records the threshold it was asked to read each map at and draws nothing itself."""

    def __init__(self) -> None:
        super().__init__(SMALL)
        self.thresholds: list[float] = []

    def refine(self, images, mask_probs, threshold=0.5, autocast=None):
        self.thresholds.append(threshold)
        return [np.asarray(p) for p in mask_probs]


def test_fallback_lowers_the_threshold_only_on_allowed_empty_maps():
    image = np.zeros((40, 40), np.uint8)
    faint = np.zeros((40, 40), np.float32)
    faint[10:20, 10:20] = 0.3  # nothing reaches 0.5
    drawn = faint.copy()
    drawn[10:20, 10:20] = 0.9
    refiner = Recording()
    fb = fallback.Fallback(refiner, allow=[True, False, True, True], relative=0.5)
    fb.refine([image] * 4, [faint, faint, drawn, np.zeros_like(faint)])
    # allowed and faint: read at half its maximum; not allowed, already drawn, or all zero: the usual 0.5
    assert refiner.thresholds == pytest.approx([0.15, 0.5, 0.5, 0.5])
    assert fb.used == [True, False, False, False]


def test_dice_of_scores_counts_two_empty_masks_as_agreeing():
    class S:
        tp, fp, fn = np.array([5, 0, 0]), np.array([5, 0, 3]), np.array([0, 0, 0])
    assert fallback.dice(S()) == pytest.approx([2 * 5 / 15, 1.0, 0.0])


def _ellipse(h: int, w: int, size=(200, 200)) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    cv2.ellipse(mask, (size[1] // 2, size[0] // 2), (w // 2, h // 2), 0, 0, 360, 1, -1)
    return mask.astype(bool)


def test_descriptors_read_orientation_shape_and_echo():
    grey = np.full((200, 200), 120, np.uint8)
    tall, wide = _ellipse(80, 40), _ellipse(40, 80)
    grey_dark = grey.copy()
    grey_dark[tall] = 40  # a dark (hypoechoic) lesion
    f_tall = dict(zip(shape.FEATURES, shape.describe(grey_dark, tall)))
    f_wide = dict(zip(shape.FEATURES, shape.describe(grey, wide)))
    assert f_tall["log_aspect"] > 0.5 > -0.5 > f_wide["log_aspect"]  # taller than wide vs wider than tall
    assert f_tall["solidity"] > 0.95 and f_tall["circularity"] > 0.7  # an ellipse is convex and smooth
    assert f_tall["log_echo"] < -0.5 and abs(f_wide["log_echo"]) < 1e-6  # darker inside than its rim
    star = np.zeros((200, 200), np.uint8)
    points = [(100 + int(r * np.cos(a)), 100 + int(r * np.sin(a)))
              for a, r in zip(np.linspace(0, 2 * np.pi, 16, endpoint=False), [60, 20] * 8)]
    cv2.fillPoly(star, [np.array(points, np.int32)], 1)
    f_star = dict(zip(shape.FEATURES, shape.describe(grey, star.astype(bool))))
    assert f_star["solidity"] < 0.7 and f_star["circularity"] < 0.5  # spiculated: neither convex nor round
    assert shape.describe(grey, np.zeros((200, 200), bool)) is None  # nothing drawn: no descriptors


def test_descriptors_keep_the_largest_component():
    grey = np.full((200, 200), 120, np.uint8)
    mask = _ellipse(80, 40)
    mask[5:12, 5:12] = True  # a stray blob
    assert shape.describe(grey, mask) == pytest.approx(shape.describe(grey, _ellipse(80, 40)))


def test_logistic_fit_separates_and_is_standardised():
    g = np.random.default_rng(0)
    x = np.r_[g.normal(0, 1, (50, 2)), g.normal(3, 1, (50, 2))] * [1, 1000]
    y = np.r_[np.zeros(50), np.ones(50)]
    score = shape.fit_logistic(x, y)
    s = score(x)
    assert ((s > 0) == (y == 1)).mean() > 0.9
    assert score(np.array([[-5.0, -5000.0]]))[0] < 0 < score(np.array([[8.0, 8000.0]]))[0]

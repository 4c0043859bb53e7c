"""scripts/find_axilla_text.py: the template score finds a burned-in label, at another scale too."""

from __future__ import annotations

import cv2
import numpy as np

from tests.conftest import load_script

find_axilla_text = load_script("find_axilla_text")


def _speckle(shape, seed):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 120, shape, dtype=np.uint8), (3, 3), 0)


def _label(text="RT AXILLA"):
    box = np.zeros((24, 120), np.uint8)
    cv2.putText(box, text, (2, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 2)
    return box


def test_label_score_finds_the_label_and_not_speckle():
    label = _label()
    scan = _speckle((300, 400), 0)
    scan[250:274, 40:160] = np.maximum(scan[250:274, 40:160], label)
    template = label.copy()
    assert find_axilla_text.label_score(scan, template) > 0.95
    # the scan rescaled (as BUSI's re-crops are): still found at one of the scales
    smaller = cv2.resize(scan, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
    assert find_axilla_text.label_score(smaller, template) > 0.8
    assert find_axilla_text.label_score(_speckle((300, 400), 1), template) < 0.5
    other = _speckle((300, 400), 2)
    other[250:274, 40:160] = np.maximum(other[250:274, 40:160], _label("LT BREAST"))
    assert find_axilla_text.label_score(other, template) < find_axilla_text.label_score(scan, template) - 0.2


def test_label_score_is_zero_when_no_scale_fits():
    assert find_axilla_text.label_score(np.zeros((10, 10), np.uint8), _label()) == 0.0

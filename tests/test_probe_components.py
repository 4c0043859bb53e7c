"""The ways of scripts/probe_components.py (docs/results.md, e61) on a hand-made scan."""
from __future__ import annotations

import numpy as np

from busiseg.data.crops import lesion_box
from busiseg.models.mask_refiner import MaskRefiner, RefinerSettings
from tests.conftest import load_script

probe = load_script("probe_components")

SMALL = RefinerSettings(size=32, decoder_channels=(32, 16, 16, 8, 8), test_margins=(1.5,))


def test_components_come_largest_first():
    mask = np.zeros((20, 20), bool)
    mask[0:2, 0:2] = True      # 4 px
    mask[10:15, 10:15] = True  # 25 px
    mask[0:3, 15:18] = True    # 9 px
    assert [int(c.sum()) for c in probe.components(mask)] == [25, 9, 4]
    assert probe.components(np.zeros((3, 3), bool)) == []


def _scan():
    """A 120 x 120 scan, the network's probability with a large blob (over the lesion) and a small far one."""
    g = np.random.default_rng(0)
    image = g.integers(0, 255, (120, 120), dtype=np.uint8)
    prob = np.zeros((120, 120), np.float32)
    prob[20:40, 20:40] = 0.9   # the largest component
    prob[100:106, 100:106] = 0.8  # a stray blob, far from it
    truth = np.zeros((120, 120), bool)
    truth[22:38, 22:38] = True
    return image, prob, truth


def test_ways_refine_around_the_components_and_the_largest_alone_erases_the_rest():
    image, prob, truth = _scan()
    refiner = MaskRefiner(SMALL)
    ways, info = probe.fold_ways(refiner, image, prob, truth, top=3, autocast=None)
    assert info["components"] == 2 and info["lesion_under"] == "largest" and info["truth_components"] == 1
    np.testing.assert_array_equal(ways["network"], prob)
    # the refine stage leaves the stray blob as the network drew it; refined_largest erases it
    np.testing.assert_array_equal(ways["refined"][100:106, 100:106], prob[100:106, 100:106])
    assert not ways["refined_largest"][90:, 90:].any()
    refined, cover = refiner.crop_probs(image, lesion_box(prob >= 0.85))  # the largest component's box
    np.testing.assert_allclose(ways["refined_largest"], cover * refined, atol=1e-6)
    np.testing.assert_allclose(ways["refined"], cover * refined + (1 - cover) * prob, atol=1e-6)
    # refined_top also re-draws the stray blob's crop
    assert not np.array_equal(ways["refined_top"][100:106, 100:106], prob[100:106, 100:106])
    # the oracle keeps the component the ground truth scores best: here the largest
    np.testing.assert_array_equal(ways["oracle_pick"], ways["refined_largest"])


def test_lesion_under_another_component_or_none():
    image, prob, truth = _scan()
    moved = np.zeros_like(truth)
    moved[101:105, 101:105] = True
    _, info = probe.fold_ways(MaskRefiner(SMALL), image, prob, moved, top=3, autocast=None)
    assert info["lesion_under"] == "other"
    elsewhere = np.zeros_like(truth)
    elsewhere[60:70, 60:70] = True
    _, info = probe.fold_ways(MaskRefiner(SMALL), image, prob, elsewhere, top=3, autocast=None)
    assert info["lesion_under"] == "none"
    # nothing drawn: every way is the network's (empty) map
    ways, info = probe.fold_ways(MaskRefiner(SMALL), image, np.zeros_like(prob), truth, top=3, autocast=None)
    assert info["components"] == 0 and info["lesion_under"] == "none"
    for way in probe.WAYS:
        assert not (ways[way] >= 0.5).any()

"""scripts/probe_refine_twice.py (e77) and scripts/probe_class_bias.py (x12) on hand-made maps and probabilities."""
from __future__ import annotations

import numpy as np

from busiseg.models.mask_refiner import MaskRefiner, RefinerSettings
from tests.conftest import load_script


twice = load_script("probe_refine_twice")
bias = load_script("probe_class_bias")
SMALL = RefinerSettings(size=32, decoder_channels=(32, 16, 16, 8, 8), test_margins=(1.5,))


class Shifting(MaskRefiner):
    """A refiner whose first reading moves the lesion 4 px right and whose second reads 0.9 over the square of the
    box's side centred on it (its cover), recording the boxes ``(cy, cx, side)`` it was asked to read."""

    def __init__(self) -> None:
        super().__init__(SMALL)
        self.boxes: list = []

    def refine(self, images, mask_probs, threshold=0.5, autocast=None):
        return [np.roll(np.asarray(p, np.float32), 4, axis=1) for p in mask_probs]

    def crop_probs(self, grey, box, autocast=None):
        self.boxes.append(box)
        cover = np.zeros(grey.shape, np.float32)
        cover[square(box)] = 1
        return 0.9 * cover, cover


def square(box) -> tuple[slice, slice]:
    cy, cx, side = (int(v) for v in box)
    return slice(max(cy - side // 2, 0), cy + side // 2), slice(max(cx - side // 2, 0), cx + side // 2)


def test_refine_twice_reads_again_around_the_first_refined_mask():
    image = np.zeros((40, 40), np.uint8)
    prob = np.zeros((40, 40), np.float32)
    prob[10:20, 10:20] = 0.8  # the network's lesion; the first reading moves it to columns 14..23
    fake = Shifting()
    first = twice.Twice(fake, "refined").refine([image], [prob])[0]
    assert fake.boxes == [] and first[10:20, 14:24].min() == np.float32(0.8)
    again = twice.Twice(fake, "refined_twice").refine([image], [prob])[0]
    assert fake.boxes == [(15.0, 19.0, 10.0)]  # around the refined mask (columns 14..23), not the network's
    inside = np.zeros((40, 40), bool)
    inside[square(fake.boxes[0])] = True
    assert np.allclose(again[inside], 0.9) and np.array_equal(again[~inside], first[~inside])
    mean = twice.Twice(fake, "refined_twice_mean").refine([image], [prob])[0]
    assert np.allclose(mean[inside], (0.9 + first[inside]) / 2) and np.array_equal(mean[~inside], first[~inside])


def test_refine_twice_leaves_an_empty_refined_mask_alone():
    image = np.zeros((40, 40), np.uint8)
    faint = np.full((40, 40), 0.2, np.float32)
    fake = Shifting()
    out = twice.Twice(fake, "refined_twice").refine([image], [faint])[0]
    assert fake.boxes == [] and np.array_equal(out, np.roll(faint, 4, axis=1))


def test_class_bias_finds_the_shift_that_undoes_a_bias_and_none_where_argmax_is_right():
    truth = np.array(["benign"] * 6 + ["normal"] * 4)
    probs = np.array([[0.5, 0.45, 0.05]] * 6 + [[0.8, 0.15, 0.05]] * 4)  # benign under-called
    assert bias.shifted_accuracy(truth, probs, (0.0, 0.0)) == 0.4
    # benign needs log 0.45 + a > log 0.5 (a >= 0.2 on the grid) and a < log(0.8 / 0.15) for the normal ones:
    # every such shift is perfect, and the smallest is chosen
    assert bias.chosen_shift(truth, probs) == (0.2, 0.0)
    assert bias.shifted_accuracy(truth, probs, (0.2, 0.0)) == 1.0 and bias.shifted_accuracy(truth, probs, (0.1, 0.0)) == 0.4
    right = np.array([[0.1, 0.8, 0.1]] * 6 + [[0.8, 0.15, 0.05]] * 4)
    assert bias.chosen_shift(truth, right) == (0.0, 0.0)

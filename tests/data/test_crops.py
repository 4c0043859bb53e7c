import cv2
import numpy as np
import pytest

from busiseg.data.crops import lesion_box, normal_boxes, paste_crop, peak_box, square_crop


def _image(h=100, w=120, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)


def test_lesion_box_is_the_centre_and_longer_side_of_the_mask():
    mask = np.zeros((100, 120), bool)
    mask[20:40, 30:46] = True  # 20 rows, 16 columns
    assert lesion_box(mask) == (30.0, 38.0, 20.0)


def test_lesion_box_of_an_empty_mask_is_none_and_a_speck_gets_the_minimum_side():
    assert lesion_box(np.zeros((10, 10), bool)) is None
    speck = np.zeros((50, 50), bool)
    speck[10, 20] = True
    assert lesion_box(speck, min_side=8) == (10.5, 20.5, 8.0)


def test_crop_at_scale_one_is_the_pixels_of_the_square():
    image = _image()
    box = (30.0, 38.0, 20.0)  # rows 20-40, columns 28-48
    assert np.array_equal(square_crop(image, box, margin=1.0, size=20), image[20:40, 28:48])


def test_margin_widens_the_square_and_shift_moves_it():
    image = _image()
    wide = square_crop(image, (50.0, 60.0, 10.0), margin=3.0, size=30)  # 30 px square: rows 35-65, cols 45-75
    assert np.array_equal(wide, image[35:65, 45:75])
    moved = square_crop(image, (50.0, 60.0, 10.0), margin=3.0, size=30, shift=(0.1, -0.2))  # +3 rows, -6 columns
    assert np.array_equal(moved, image[38:68, 39:69])


def test_outside_the_image_is_zero():
    image = _image()
    crop = square_crop(image, (5.0, 5.0, 20.0), margin=1.0, size=20)  # rows and columns -5..15
    assert crop[:5].max() == 0 and crop[:, :5].max() == 0
    assert np.array_equal(crop[5:, 5:], image[:15, :15])


def test_shrinking_averages_areas_instead_of_sampling_pixels():
    image = _image(400, 400)
    crop = square_crop(image, (200.0, 200.0, 400.0), margin=1.0, size=100)
    assert crop.shape == (100, 100) and crop.dtype == np.uint8
    assert np.array_equal(crop, cv2.resize(image, (100, 100), interpolation=cv2.INTER_AREA))
    assert crop.std() < 0.5 * image.std()  # noise averaged out, not aliased through


@pytest.mark.parametrize("margin,size", [(0.0, 32), (-1.0, 32), (1.0, 0)])
def test_bad_margin_or_size_is_refused(margin, size):
    with pytest.raises(ValueError, match="margin"):
        square_crop(_image(), (50.0, 50.0, 10.0), margin=margin, size=size)


@pytest.mark.parametrize("box,margin,size,shift", [((150.0, 200.0, 60.0), 2.0, 128, (0.0, 0.0)),
                                                   ((100.0, 120.0, 100.0), 1.5, 64, (0.1, -0.1)),
                                                   ((150.0, 200.0, 30.0), 1.0, 30, (0.0, 0.0))])
def test_paste_crop_lays_a_crop_back_where_it_was_cut(box, margin, size, shift):
    smooth = cv2.GaussianBlur(np.random.default_rng(0).random((300, 400)).astype(np.float32), (0, 0), 8)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    crop = square_crop(smooth, box, margin, size, shift)
    pasted, coverage = paste_crop(crop, box, margin, smooth.shape, shift)
    inside = coverage > 0.999
    side = box[2] * margin
    assert abs(inside.sum() - side ** 2) <= 4 * side  # the square, up to its edge pixels
    assert np.abs(pasted[inside] - smooth[inside]).max() < 0.01
    rows, cols = np.nonzero(inside)
    cy, cx = box[0] + shift[0] * side, box[1] + shift[1] * side
    assert abs(rows.mean() - (cy - 0.5)) < 1 and abs(cols.mean() - (cx - 0.5)) < 1
    assert pasted[coverage == 0].max() == 0 and coverage.max() <= 1 + 1e-6


def test_paste_crop_refuses_a_non_square_map():
    with pytest.raises(ValueError, match="square"):
        paste_crop(np.zeros((4, 5), np.float32), (10.0, 10.0, 4.0), 1.0, (20, 20))


def test_peak_box_is_the_component_around_the_peak_at_half_its_height():
    prob = np.zeros((100, 120), np.float32)
    prob[10:50, 10:50] = 0.4  # the larger region, but below half the peak
    prob[60:80, 70:90] = 0.7
    prob[70, 80] = 0.9  # the peak: its component at >= 0.45 is the 20 x 20 square
    prob[5:8, 100:103] = 0.6  # above half the peak but not connected to it
    assert peak_box(prob) == (70.0, 80.0, 20.0)
    assert peak_box(np.zeros((10, 10), np.float32)) is None


def test_normal_boxes_random_then_dark_spots_with_lesion_sides():
    h, w = 100, 200
    grey = np.full((h, w), 180, np.uint8)
    grey[:, :100] = 60  # the left half is dark: every dark-spot box lands there
    sides = np.array([0.1, 0.2])
    boxes = normal_boxes(grey, 4, sides, np.random.default_rng(0))
    assert len(boxes) == 4
    assert all(side in (20.0, 40.0) for _, _, side in boxes)  # a lesion's share of the width, times the width
    cy, cx, _ = boxes[0]
    assert 0.1 * h <= cy <= 0.9 * h and 0.1 * w <= cx <= 0.9 * w
    assert all(cx < 100 for _, cx, _ in boxes[1:])
    assert boxes == normal_boxes(grey, 4, sides, np.random.default_rng(0))  # drawn by the generator alone
    tiny = normal_boxes(grey, 1, np.array([0.01, 2.0]), np.random.default_rng(1))
    assert 8.0 <= tiny[0][2] <= h  # clipped to 8 px .. the scan

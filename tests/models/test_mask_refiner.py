"""The mask refiner: settings, training, what refine changes and what it leaves, the file, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busiseg.data.crops import lesion_box
from busiseg.models.mask_refiner import (
    MaskRefiner,
    MaskRefinerError,
    RefinerSettings,
    check_not_trained_on,
    load_mask_refiner,
    save_mask_refiner,
    train_mask_refiner,
)

SMALL = RefinerSettings(size=32, decoder_channels=(32, 16, 16, 8, 8), epochs=15, batch_size=8, lr=3e-3,
                        test_margins=(1.5, 2.0), blend="mean")


@pytest.mark.parametrize("kwargs, text", [
    ({"size": 48}, "size=48"),
    ({"decoder_channels": (16, 8)}, "decoder_channels"),
    ({"train_margin": (3.0, 1.2)}, "train_margin"),
    ({"test_margins": ()}, "test_margins"),
    ({"jitter": 0.5}, "jitter=0.5"),
    ({"blend": "max"}, "blend='max'"),
    ({"outside": "drop"}, "outside='drop'"),
])
def test_settings_out_of_range_are_named(kwargs, text):
    with pytest.raises(MaskRefinerError, match=text):
        RefinerSettings(**kwargs)


def _scans(n: int, seed: int):
    """Grey scans of different sizes, each with one dark ellipse (the lesion) on speckle, and its mask."""
    g = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        h, w = int(g.integers(90, 150)), int(g.integers(90, 150))
        yy, xx = np.mgrid[:h, :w]
        ry, rx = g.uniform(8, 22), g.uniform(8, 22)
        cy, cx = g.uniform(ry + 2, h - ry - 2), g.uniform(rx + 2, w - rx - 2)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image = np.clip(g.normal(150, 20, (h, w)) - 100 * mask, 0, 255).astype(np.uint8)
        images.append(image)
        masks.append(mask)
    return images, masks


def _coarse(mask: np.ndarray, grow: int) -> np.ndarray:
    """What a low-resolution network draws: the lesion's bounding box grown by ``grow`` px, probability 0.9."""
    cy, cx, _ = lesion_box(mask)
    ys, xs = np.nonzero(mask)
    prob = np.zeros(mask.shape, np.float32)
    prob[max(0, ys.min() - grow):ys.max() + grow + 1, max(0, xs.min() - grow):xs.max() + grow + 1] = 0.9
    return prob


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))


def test_training_learns_sharper_masks_is_seeded_and_records_its_images(tmp_path):
    images, masks = _scans(24, seed=0)
    names = [f"benign/{i}.png" for i in range(24)]
    losses = []
    model, history = train_mask_refiner(images, masks, SMALL, names,
                                        on_epoch=lambda epoch, loss: losses.append((epoch, loss)))
    assert [e for e, _ in losses] == list(range(SMALL.epochs)) and [v for _, v in losses] == history
    assert history[-1] < history[0] / 2
    assert model.trained_on == names
    test_images, test_masks = _scans(12, seed=1)  # other scans
    coarse = [_coarse(m, 4) for m in test_masks]
    replace = MaskRefiner(RefinerSettings(**{**SMALL.__dict__, "blend": "replace"}))
    replace.net.load_state_dict(model.net.state_dict())
    refined = replace.refine(test_images, coarse)
    before = np.mean([_dice(c > 0.5, m) for c, m in zip(coarse, test_masks)])
    after = np.mean([_dice(r > 0.5, m) for r, m in zip(refined, test_masks)])
    assert after > before + 0.05, (before, after)  # the box's corners and margin are gone
    # refining right after training rounds exactly as the network read back from its file
    loaded = load_mask_refiner(save_mask_refiner(model, tmp_path / "r.pt"))
    for a, b in zip(loaded.refine(test_images, coarse), model.refine(test_images, coarse)):
        np.testing.assert_array_equal(a, b)
    again, _ = train_mask_refiner(images, masks, SMALL, names)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_refine_blends_inside_the_crops_only_and_leaves_empty_masks_alone():
    images, masks = _scans(2, seed=2)
    model = MaskRefiner(SMALL)
    probs = [_coarse(masks[0], 2), np.full(masks[1].shape, 0.3, np.float32)]  # nothing above 0.5 on the second
    box = lesion_box(probs[0] > 0.5)
    probs[0][:3, :3] = 0.95  # a speck: the crops go round the larger component
    mean = model.refine(images, probs)
    np.testing.assert_array_equal(mean[1], probs[1])
    crop, cover = model.crop_probs(images[0], box)
    inside, outside = cover == 1, cover == 0
    assert inside.sum() > 0 and outside.sum() > 0 and outside[:3, :3].all()
    np.testing.assert_allclose(mean[0][inside], ((crop + probs[0]) / 2)[inside], atol=1e-6)
    np.testing.assert_array_equal(mean[0][outside], probs[0][outside])
    with pytest.raises(ValueError, match=r"shape \(5, 5\) for an image of"):
        model.refine(images[:1], [np.zeros((5, 5), np.float32)])


def test_outside_erase_leaves_only_the_refined_crops_and_empty_masks_alone():
    images, masks = _scans(2, seed=2)
    probs = [_coarse(masks[0], 2), np.full(masks[1].shape, 0.3, np.float32)]
    box = lesion_box(probs[0] > 0.5)
    probs[0][:3, :3] = 0.95  # a speck far from the lesion: another component
    keep = MaskRefiner(RefinerSettings(**{**SMALL.__dict__, "blend": "replace"}))
    erase = MaskRefiner(RefinerSettings(**{**SMALL.__dict__, "blend": "replace", "outside": "erase"}))
    erase.net.load_state_dict(keep.net.state_dict())
    kept, erased = keep.refine(images, probs), erase.refine(images, probs)
    crop, cover = keep.crop_probs(images[0], box)
    outside = cover == 0
    np.testing.assert_array_equal(kept[0][outside], probs[0][outside])  # the speck stays with keep
    assert not erased[0][outside].any()  # and goes with erase
    np.testing.assert_allclose(erased[0], cover * crop, atol=1e-6)
    np.testing.assert_array_equal(erased[1], probs[1])  # nothing drawn: the network's map either way


def test_training_and_file_refusals(tmp_path):
    images, masks = _scans(2, seed=3)
    with pytest.raises(MaskRefinerError, match="every training mask needs a lesion"):
        train_mask_refiner(images, [masks[0], np.zeros_like(masks[1])], SMALL)
    model = MaskRefiner(SMALL, ["benign/benign (1).png"])
    path = save_mask_refiner(model, tmp_path / "r.pt", fit_seconds=2.5)
    assert torch.load(path, weights_only=True)["fit_seconds"] == 2.5  # plain values only
    loaded = load_mask_refiner(path)
    assert loaded.settings == model.settings and loaded.trained_on == model.trained_on
    with pytest.raises(MaskRefinerError, match=r"nope.pt: mask refiner not found"):
        load_mask_refiner(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a file torch reads")
    with pytest.raises(MaskRefinerError, match=r"junk.pt: not a readable mask-refiner file"):
        load_mask_refiner(tmp_path / "junk.pt")
    torch.save({"format": "busiseg.crop_classifier/1"}, tmp_path / "crop.pt")
    with pytest.raises(MaskRefinerError, match=r"crop.pt: not a busiseg mask refiner"):
        load_mask_refiner(tmp_path / "crop.pt")
    with pytest.raises(MaskRefinerError, match=r"r.pt: the mask refiner was trained on 1 of the 2 images"):
        check_not_trained_on(loaded, ["benign/benign (1).png", "benign/benign (2).png"], path)
    check_not_trained_on(loaded, ["benign/benign (2).png"], path)

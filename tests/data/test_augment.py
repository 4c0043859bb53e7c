"""Masks stay aligned with images under every recipe."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from busiseg.data import augment
from tests.conftest import REPO


def _marked_pair(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    # the image is bright exactly where the mask is, dark elsewhere, so any geometric
    # transform applied to one but not the other shows up as disagreement
    mask = np.zeros((size, size), np.uint8)
    mask[10:30, 14:40] = 1
    mask[40:50, 5:15] = 1
    image = np.where(mask > 0, 220, 30).astype(np.uint8)
    return image, mask


@pytest.mark.parametrize("recipe", ["seed", "standard", "strong", "none"])
def test_recipes_from_config_keep_mask_aligned(recipe: str):
    with initialize_config_dir(config_dir=str(REPO / "conf" / "augment"), version_base="1.3"):
        cfg = compose(config_name=recipe)
    transform = instantiate(cfg)
    image, mask = _marked_pair()
    for i in range(50):
        out = transform(image=image, mask=mask)
        img, m = out["image"], out["mask"]
        assert img.shape == image.shape and m.shape == mask.shape
        assert set(np.unique(m)) <= {0, 1}, "mask must stay binary"
        if m.sum() == 0:
            continue
        # inside the mask the image is bright, outside dark (allowing blur at the borders)
        inner = img[m > 0].astype(float).mean()
        outer = img[m == 0].astype(float).mean()
        assert inner > outer + 40, f"{recipe}: draw {i} misaligned ({inner:.0f} vs {outer:.0f})"


def test_standard_recipe_geometry_moves_both():
    t = augment.standard_recipe(flip_p=1.0, affine_p=0.0, brightness_contrast_p=0, gamma_p=0, blur_noise_p=0)
    image, mask = _marked_pair()
    out = t(image=image, mask=mask)
    np.testing.assert_array_equal(out["mask"], mask[:, ::-1])
    np.testing.assert_array_equal(out["image"], image[:, ::-1])


def test_seed_recipe_has_lighter_and_darker_draws():
    t = augment.seed_recipe(flip_p=0.0, blur_p=0.0, seed=0)
    image = np.full((32, 32), 100, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    means = [t(image=image, mask=mask)["image"].mean() for _ in range(60)]
    assert any(m == 100 for m in means), "some images stay as they are"
    assert any(m > 110 for m in means), "some are lighter"
    assert any(m < 95 for m in means), "some are darker"


def test_seeded_recipe_is_reproducible():
    image, mask = _marked_pair()
    a = [augment.standard_recipe(seed=3)(image=image, mask=mask)["image"] for _ in range(1)]
    b = [augment.standard_recipe(seed=3)(image=image, mask=mask)["image"] for _ in range(1)]
    np.testing.assert_array_equal(a[0], b[0])

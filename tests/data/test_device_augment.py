"""The on-device recipes equal the albumentations ones, operation by operation (CPU tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import albumentations as A

from busiseg.data import augment
from busiseg.data.device_augment import (SeedTensorAugment, StandardTensorAugment, affine, brightness_contrast,
                                         flip, from_augment_config, gamma)


def _pair(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((size, size), np.uint8)
    mask[10:30, 14:40] = 1
    mask[40:50, 5:15] = 1
    rng = np.random.default_rng(0)
    image = np.where(mask > 0, 200, 60).astype(np.uint8) + rng.integers(0, 40, (size, size), dtype=np.uint8)
    return image, mask


def _t(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(image).float().div(255)[None, None], torch.from_numpy(mask).float()[None, None]


@pytest.mark.parametrize("b,c", [(0.2, 0.0), (0.0, -0.3), (-0.1, 0.15)])
def test_brightness_contrast_equals_albumentations(b, c):
    image, mask = _pair()
    ref = A.RandomBrightnessContrast(brightness_limit=(b, b), contrast_limit=(c, c), p=1.0)(image=image)["image"]
    ti, _ = _t(image, mask)
    out = brightness_contrast(ti, torch.tensor([b]), torch.tensor([c]))[0, 0].numpy()
    assert np.abs(out - ref / 255.0).max() <= 1.0 / 255 + 1e-6  # uint8 rounding


@pytest.mark.parametrize("g", [80, 120])
def test_gamma_equals_albumentations(g):
    image, mask = _pair()
    ref = A.RandomGamma(gamma_limit=(g, g), p=1.0)(image=image)["image"]
    out = gamma(_t(image, mask)[0], torch.tensor([float(g)]))[0, 0].numpy()
    assert np.abs(out - ref / 255.0).max() <= 1.0 / 255 + 1e-6


def test_flip_exact():
    image, mask = _pair()
    ti, tm = _t(image, mask)
    fi, fm = flip(ti, tm, torch.tensor([True]))
    np.testing.assert_array_equal(fm[0, 0].numpy(), mask[:, ::-1])
    np.testing.assert_allclose(fi[0, 0].numpy(), image[:, ::-1] / 255.0, atol=1e-7)


@pytest.mark.parametrize("scale,tx,ty,rot,min_iou", [(1.0, 0, 0, 10, 0.99), (1.1, 0, 0, 0, 0.99),
                                                     (1.0, 0.05, 0, 0, 0.99), (1.0, 0, -0.05, 0, 0.99),
                                                     (0.9, 0.05, -0.05, -10, 0.93)])
def test_affine_matches_albumentations(scale, tx, ty, rot, min_iou):
    image, mask = _pair()
    ref = A.Affine(scale=(scale, scale), translate_percent={"x": (tx, tx), "y": (ty, ty)}, rotate=(rot, rot),
                   border_mode=0, fill=0, fill_mask=0, p=1.0)(image=image, mask=mask)
    ti, tm = _t(image, mask)
    oi, om = affine(ti, tm, torch.tensor([True]), torch.tensor([scale]), torch.tensor([tx]), torch.tensor([ty]),
                    torch.tensor([float(rot)]))
    a, b = ref["mask"] > 0, om[0, 0].numpy() > 0
    assert (a & b).sum() / (a | b).sum() >= min_iou
    # sub-pixel differences on the textured image (albumentations rounds shifts to pixels)
    assert np.abs(oi[0, 0].numpy() - ref["image"] / 255.0).mean() < 0.02


def _strong_from_config():
    # augment=strong (busi_cpu's): the same tensor recipe as standard at its wider parameters
    import yaml

    from tests.conftest import REPO

    cfg = yaml.safe_load((REPO / "conf" / "augment" / "strong.yaml").read_text())
    recipe = from_augment_config(cfg)
    assert isinstance(recipe, StandardTensorAugment)
    return recipe


@pytest.mark.parametrize("recipe", [SeedTensorAugment(), StandardTensorAugment(affine_p=1.0), _strong_from_config()])
def test_recipes_keep_masks_aligned_and_binary(recipe):
    image, mask = _pair()
    ti, tm = _t(image, mask)
    images, masks = recipe(ti.repeat(32, 1, 1, 1), tm.repeat(32, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    assert images.shape == (32, 1, 64, 64) and masks.shape == (32, 1, 64, 64)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    for img, m in zip(images, masks):
        if m.sum() > 0:
            assert img[m > 0].mean() > img[m == 0].mean() + 0.15
    # it augments: most images change, and some masks move with them (an identity passed the checks above)
    changed = (images - ti).abs().flatten(1).amax(dim=1) > 1e-3
    assert changed.float().mean() > 0.5
    assert ((masks - tm).abs().flatten(1).sum(dim=1) > 0).any()


def test_seed_recipe_draws_as_is_lighter_darker_like_albumentations():
    flat = torch.full((3000, 1, 8, 8), 100 / 255.0)
    out, _ = SeedTensorAugment(flip_p=0, blur_p=0)(flat, torch.zeros_like(flat), generator=torch.Generator().manual_seed(1))
    means = out.mean(dim=(1, 2, 3)) * 255
    shares = [(means.round() == 100).float().mean(), (means > 101).float().mean(), (means < 99).float().mean()]
    assert all(abs(float(s) - 1 / 3) < 0.05 for s in shares), shares
    # the same shares from the albumentations recipe
    t = augment.seed_recipe(flip_p=0, blur_p=0, seed=0)
    img = np.full((8, 8), 100, np.uint8)
    ref = np.array([t(image=img, mask=np.zeros_like(img))["image"].mean() for _ in range(600)])
    assert abs((ref > 101).mean() - float(shares[1])) < 0.08 and abs((ref < 99).mean() - float(shares[2])) < 0.08


def test_from_augment_config():
    assert isinstance(from_augment_config({"_target_": "busiseg.data.augment.seed_recipe", "flip_p": 0.3}),
                      SeedTensorAugment)
    assert from_augment_config({"_target_": "busiseg.data.augment.no_augmentation"}) is None
    with pytest.raises(ValueError, match="augment_on_device"):
        from_augment_config({"_target_": "my.Recipe"})


def test_device_resident_loader_gives_the_dataloader_samples(tiny_busi):
    from busiseg.data.datamodule import BusiDataModule
    from busiseg.data.splits import HoldoutSplitter

    dm = BusiDataModule(str(tiny_busi), image_size=32, batch_size=4, device_resident=True,
                        splitter=HoldoutSplitter(0.25, 0.25, seed=0, group_duplicates=False))
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 1 and batches[0]["image"].shape == (4, 1, 32, 32)
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert set(seen) <= set(dm.train_dataset.indices)
    for b in batches:
        for j, idx in enumerate(b["index"].tolist()):
            ref = dm.train_dataset[dm.train_dataset.indices.index(idx)]  # no CPU transform set
            for key in ("image", "mask", "label"):
                assert torch.equal(b[key][j], ref[key])


def test_device_resident_needs_memory_cache(tiny_busi):
    from busiseg.data.datamodule import BusiDataModule

    with pytest.raises(ValueError, match="data.device_resident needs data.cache=memory"):
        BusiDataModule(str(tiny_busi), device_resident=True, cache="none")

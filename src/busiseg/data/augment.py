"""Augmentation recipes (config group ``augment``): albumentations pipelines that move
image and mask together.

Each recipe returns an ``A.Compose`` that takes ``image`` (uint8 HxW or HxWx3) and
``mask`` (uint8 HxW) and returns them transformed, same size. Geometric transforms
use nearest-neighbour interpolation on the mask, so it stays binary and aligned.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402


def _compose(transforms: list, seed: int | None) -> A.Compose:
    return A.Compose(transforms, seed=seed)


def seed_recipe(
    lighter: tuple[float, float] = (0.1, 0.3),
    darker: tuple[float, float] = (-0.4, -0.1),
    flip_p: float = 0.5,
    blur_p: float = 0.2,
    seed: int | None = None,
) -> A.Compose:
    """The study's recipe: each image as it is, lighter (brightness) or darker (contrast),
    with equal odds, plus horizontal flip and Gaussian blur.

    Contrast in albumentations scales pixel values (``x * (1 + c)``), so a negative
    contrast darkens the whole image; brightness adds a fraction of the maximum.
    This keeps the network from keying on absolute darkness to find lesions.
    """
    return _compose(
        [
            A.OneOf(
                [
                    A.NoOp(),
                    A.RandomBrightnessContrast(brightness_limit=tuple(lighter), contrast_limit=(0.0, 0.0), p=1.0),
                    A.RandomBrightnessContrast(brightness_limit=(0.0, 0.0), contrast_limit=tuple(darker), p=1.0),
                ],
                p=1.0,
            ),
            A.HorizontalFlip(p=flip_p),
            A.GaussianBlur(blur_limit=(3, 5), p=blur_p),
        ],
        seed,
    )


def standard_recipe(
    flip_p: float = 0.5,
    affine_p: float = 0.5,
    scale: tuple[float, float] = (0.9, 1.1),
    translate: float = 0.05,
    rotate: float = 10.0,
    brightness: float = 0.2,
    contrast: float = 0.2,
    brightness_contrast_p: float = 0.5,
    gamma: tuple[float, float] = (80, 120),
    gamma_p: float = 0.3,
    blur_noise_p: float = 0.2,
    seed: int | None = None,
) -> A.Compose:
    """A conventional recipe: flip, mild affine, brightness/contrast, gamma, blur or noise."""
    return _compose(
        [
            A.HorizontalFlip(p=flip_p),
            A.Affine(
                scale=tuple(scale),
                translate_percent=(-translate, translate),
                rotate=(-rotate, rotate),
                border_mode=0,
                fill=0,
                fill_mask=0,
                p=affine_p,
            ),
            A.RandomBrightnessContrast(brightness_limit=brightness, contrast_limit=contrast, p=brightness_contrast_p),
            A.RandomGamma(gamma_limit=tuple(gamma), p=gamma_p),
            A.OneOf(
                [A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.GaussNoise(std_range=(0.02, 0.08), p=1.0)],
                p=blur_noise_p,
            ),
        ],
        seed,
    )


def no_augmentation(seed: int | None = None) -> A.Compose:
    """Identity: the cached, resized image as it is."""
    return _compose([], seed)

"""Mixup and CutMix of training batches (busiseg.data.mixing)."""

from __future__ import annotations

import pytest
import torch

from busiseg.data.mixing import BatchMix


def _batch(n: int = 6, size: int = 32):
    """Sample i is the constant image i and has class i: a mixed image's mean then tells which classes it
    holds and in what shares."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, size, size).clone()
    masks = torch.zeros(n, 1, size, size)
    masks[::2, :, 8:24, 8:24] = 1.0
    return images, masks, torch.arange(n)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_class_targets_are_the_shares_of_the_mixed_images(kind):
    images, masks, labels = _batch()
    mix = BatchMix(kind=kind, alpha=1.0, p=1.0, num_classes=6, seed=3)
    mixed = 0
    for step in range(20):
        out_images, out_masks, targets = mix(images, masks, labels, step=step)
        assert targets.shape == (6, 6) and torch.allclose(targets.sum(dim=1), torch.ones(6))
        # the image's mean is sum_c share_c * c exactly when the targets carry the pixel shares
        expected = targets @ torch.arange(6, dtype=torch.float32)
        assert torch.allclose(out_images.mean(dim=(1, 2, 3)), expected, atol=1e-5)
        mixed += int((targets.max(dim=1).values < 1).any())
        if kind == "cutmix":
            assert set(out_masks.unique().tolist()) <= {0.0, 1.0}  # pasted, never blended
        else:
            assert torch.all((out_masks >= 0) & (out_masks <= 1))
    assert mixed >= 15  # p=1: every batch mixed (a permutation can leave a few samples with themselves)


def test_mask_travels_with_its_image():
    images, masks, labels = _batch()
    out_images, out_masks, _ = BatchMix(kind="cutmix", alpha=1.0, p=1.0, num_classes=6, seed=0)(
        images, masks, labels, step=1)
    # every pixel of the result comes from one source sample (its value names it): the mask there is that sample's
    src = out_images[:, 0].round().long()
    yy, xx = torch.arange(32)[:, None], torch.arange(32)[None, :]
    assert torch.equal(out_masks[:, 0], masks[:, 0][src, yy, xx])
    assert (src != torch.arange(6)[:, None, None]).any()  # something was pasted


def test_p_zero_and_tiny_batches_are_left_alone():
    images, masks, labels = _batch()
    out_images, out_masks, targets = BatchMix(kind="mixup", p=0.0, num_classes=6)(images, masks, labels, step=0)
    assert out_images is images and out_masks is masks
    assert torch.equal(targets, torch.eye(6))
    one = BatchMix(kind="cutmix", p=1.0, num_classes=6)(images[:1], masks[:1], labels[:1], step=0)
    assert torch.equal(one[0], images[:1])


def test_the_same_step_mixes_the_same_way_and_other_steps_differ():
    images, masks, labels = _batch()
    mix = BatchMix(kind="cutmix", p=1.0, num_classes=6, seed=7)
    a, b = mix(images, masks, labels, step=5), mix(images, masks, labels, step=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    others = [mix(images, masks, labels, step=s)[2] for s in range(6, 12)]
    assert any(not torch.equal(a[2], t) for t in others)
    other_seed = BatchMix(kind="cutmix", p=1.0, num_classes=6, seed=8)(images, masks, labels, step=5)
    assert not torch.equal(a[0], other_seed[0])


@pytest.mark.parametrize(("kwargs", "key"), [({"kind": "mosaic"}, "mix.kind"), ({"alpha": 0}, "mix.alpha"),
                                             ({"p": 1.5}, "mix.p")])
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        BatchMix(**kwargs)

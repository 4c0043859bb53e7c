"""busiseg.data.corruptions: the restoration pretext's corruptions (Models Genesis)."""

from __future__ import annotations

import pytest
import torch

from busiseg.data.corruptions import RestorationCorruption, monotone_curve, paint, shuffle_blocks


def _images(b: int = 6, c: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_shuffle_blocks_permutes_within_each_tile_only():
    x = _images(3, 3)
    y = shuffle_blocks(x, 4, 1.0, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and not torch.equal(x, y)
    tiles = lambda t: t.reshape(3, 3, 8, 4, 8, 4).permute(0, 1, 2, 4, 3, 5).reshape(3, 3, 64, 16)  # noqa: E731
    # every tile holds the same values, in another order
    assert torch.equal(tiles(x).sort(dim=-1).values, tiles(y).sort(dim=-1).values)
    # the channels of a pixel move together (one permutation per tile)
    moved = tiles(y)
    order0 = tiles(x)[:, 0].unsqueeze(-1) == moved[:, 0].unsqueeze(-2)
    order1 = tiles(x)[:, 1].unsqueeze(-1) == moved[:, 1].unsqueeze(-2)
    assert torch.equal(order0, order1)
    assert torch.equal(shuffle_blocks(x, 4, 0.0), x)
    with pytest.raises(ValueError, match="multiple of the shuffle block"):
        shuffle_blocks(_images(1, 1, 30), 4, 1.0)


def test_monotone_curve_keeps_or_reverses_the_order_of_grey_levels():
    x = _images(16)
    y = monotone_curve(x, torch.Generator().manual_seed(3))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    directions = set()
    for xi, yi in zip(x.flatten(1), y.flatten(1)):
        ys = yi[xi.argsort()]
        steps = ys[1:] - ys[:-1]
        assert (steps >= -1e-6).all() or (steps <= 1e-6).all()
        directions.add(bool((steps >= -1e-6).all()))
        assert not torch.allclose(xi, yi)
    assert directions == {True, False}  # both kinds appear in 16 images


def test_paint_in_keeps_most_of_the_image_and_out_keeps_little():
    x = _images(1, 1, 64)[0]
    g = torch.Generator().manual_seed(7)  # not the image's seed: the noise must differ from it
    kept_in = (paint(x, outpaint=False, boxes=2, generator=g) == x).float().mean()
    kept_out = (paint(x, outpaint=True, boxes=1, generator=g) == x).float().mean()
    assert 0.75 < kept_in < 1.0
    assert 0.15 < kept_out < 0.35  # one box of 3/7 to 4/7 of each side


def test_corruption_is_seeded_leaves_its_input_and_turns_off_with_zero_probabilities():
    x = _images(4)
    before = x.clone()
    a = RestorationCorruption(seed=5)(x)
    b = RestorationCorruption(seed=5)(x)
    assert torch.equal(a, b) and torch.equal(x, before) and not torch.equal(a, x)
    assert a.shape == x.shape and a.dtype == x.dtype and a.min() >= 0 and a.max() <= 1
    off = RestorationCorruption(shuffle_p=0, curve_p=0, paint_p=0, seed=5)
    assert torch.equal(off(x), x)


@pytest.mark.parametrize("kwargs, key", [({"curve_p": 1.5}, "curve_p"), ({"shuffle_block": 1}, "shuffle_block"),
                                         ({"boxes": 0}, "boxes"), ({"outpaint_p": -0.1}, "outpaint_p")])
def test_bad_corruption_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"pretrain.corruption.{key}"):
        RestorationCorruption(**kwargs)

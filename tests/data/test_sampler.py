"""Training order: the seeded epoch shuffle and the class-balanced sampler (data.sampler)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from busiseg.data.datamodule import BusiDataModule, EpochSampler, balanced_weights
from busiseg.data.splits import HoldoutSplitter
from tests.conftest import write_case


def test_balanced_weights_power_one_gives_every_class_the_same_mass():
    labels = [0] * 2 + [1] * 8 + [2] * 4
    w = balanced_weights(labels, 1.0)
    mass = Counter()
    for weight, y in zip(w, labels):
        mass[y] += weight
    assert mass[0] == pytest.approx(mass[1]) == pytest.approx(mass[2]) == pytest.approx(1.0)
    half = balanced_weights(labels, 0.5)
    # an image of a class of 2 weighs sqrt(8 / 2) = 2x one of a class of 8 (index 2 is class 1)
    assert half[0] == pytest.approx(2 * half[2])
    assert set(balanced_weights(labels, 0.0)) == {1.0}
    with pytest.raises(ValueError, match="data.balance_power"):
        balanced_weights(labels, -1.0)


def test_weighted_epoch_sampler_is_seeded_per_epoch_and_resumes_exactly():
    w = balanced_weights([0] * 3 + [1] * 30, 1.0)
    a = list(EpochSampler(33, 7, epoch=2, weights=w))
    assert a == list(EpochSampler(33, 7, epoch=2, weights=w))  # same seed and epoch: same draws
    assert a != list(EpochSampler(33, 7, epoch=3, weights=w))
    assert a != list(EpochSampler(33, 8, epoch=2, weights=w))
    assert len({p for p, _ in a}) < 33  # with replacement: some images twice, some not at all
    assert list(EpochSampler(33, 7, epoch=2, skip=10, weights=w)) == a[10:]  # resumed mid-epoch
    s = EpochSampler(33, 7, epoch=1, skip=10, weights=w)
    s.set_epoch(2)  # a new epoch forgets the skip
    assert list(s) == a
    with pytest.raises(ValueError, match="33 non-negative weights"):
        EpochSampler(33, 7, weights=w[:-1])


@pytest.fixture
def skewed_busi(tmp_path):
    root = tmp_path / "busi"
    for n in range(1, 25):
        write_case(root, "benign", n)
    for n in range(1, 7):
        write_case(root, "malignant", n, masks=((2, 2, 12, 30),))
    for n in range(1, 5):
        write_case(root, "normal", n, masks=(None,), mask_mode="RGB")
    return root


def _drawn_labels(dm: BusiDataModule, epochs: int) -> Counter:
    counts = Counter()
    loader = dm.train_dataloader()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            counts.update(batch["label"].tolist())
    return counts


def _datamodule(root, **kwargs) -> BusiDataModule:
    dm = BusiDataModule(str(root), image_size=32, batch_size=4, seed=0,
                        splitter=HoldoutSplitter(0.1, 0.1, seed=0, group_duplicates=False), **kwargs)
    dm.setup("fit")
    return dm


def test_balanced_sampler_draws_the_rare_classes_as_often_as_the_common_one(skewed_busi):
    plain = _datamodule(skewed_busi)
    train_labels = Counter(plain.records[i].label for i in plain.train_dataset.indices)
    assert train_labels[1] >= 4 * train_labels[0]  # benign outnumbers normal in the training part
    shuffled = _drawn_labels(plain, 40)
    # shuffle: every image once per epoch (less the last partial batch)
    assert shuffled[1] >= 4 * shuffled[0]

    balanced = _drawn_labels(_datamodule(skewed_busi, sampler="balanced", balance_power=1.0), 40)
    total = sum(balanced.values())
    assert total == sum(shuffled.values())  # the same number of draws per epoch
    for c in (0, 1, 2):  # each class about a third (expected count total/3, std about sqrt(total)/2.1)
        assert abs(balanced[c] / total - 1 / 3) < 0.1, balanced


def test_sampler_keys_are_checked(tiny_busi):
    with pytest.raises(ValueError, match="data.sampler must be one of shuffle, balanced, got 'weighted'"):
        BusiDataModule(str(tiny_busi), sampler="weighted")
    with pytest.raises(ValueError, match="data.sampler=balanced is not supported with data.device_resident"):
        BusiDataModule(str(tiny_busi), sampler="balanced", device_resident=True)
    with pytest.raises(ValueError, match="data.balance_power must be >= 0"):
        BusiDataModule(str(tiny_busi), sampler="balanced", balance_power=-0.5)


def test_validation_and_test_loaders_are_not_resampled(skewed_busi):
    dm = _datamodule(skewed_busi, sampler="balanced")
    seen = torch.cat([b["index"] for b in dm.val_dataloader()]).tolist()
    assert sorted(seen) == sorted(dm.val_dataset.indices)  # every validation image exactly once
    seen = torch.cat([b["index"] for b in dm.test_dataloader()]).tolist()
    assert sorted(seen) == sorted(dm.test_dataset.indices)  # and every test image


def test_sampler_is_a_data_config_key(tmp_path):
    from hydra.utils import instantiate

    from tests.test_train import compose_train

    cfg = compose_train(tmp_path, tmp_path / "data", ["data.sampler=balanced", "data.balance_power=0.5"])
    dm = instantiate(cfg.data, _convert_="object")
    assert (dm.sampler, dm.balance_power) == ("balanced", 0.5)
    default = compose_train(tmp_path, tmp_path / "data", [])
    assert instantiate(default.data, _convert_="object").sampler == "shuffle"  # unchanged unless asked

"""The crop stage's network: the combination rule by hand, training, the file, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busiseg.models.crop_classifier import (
    CropClassifier,
    CropClassifierError,
    CropSettings,
    check_not_trained_on,
    NONE_CLASSES,
    combine_class_probs,
    combine_none_probs,
    load_crop_classifier,
    make_net,
    save_crop_classifier,
    start_from_encoder,
    train_crop_classifier,
)


def test_combine_by_hand():
    class_probs = np.array([[0.2, 0.5, 0.3],   # lesion 0.8, P(type | lesion) 0.625 / 0.375
                            [0.6, 0.3, 0.1],   # no crop: unchanged
                            [1.0, 0.0, 0.0]])  # no lesion mass: P(lesion) 0 keeps it at 0
    crop = np.array([[0.2, 0.8], [np.nan, np.nan], [0.3, 0.7]])
    out = combine_class_probs(class_probs, crop)
    np.testing.assert_allclose(out[0], [0.2, 0.8 * (0.625 + 0.2) / 2, 0.8 * (0.375 + 0.8) / 2])
    np.testing.assert_allclose(out[0], [0.2, 0.33, 0.47])
    np.testing.assert_array_equal(out[1], class_probs[1])
    np.testing.assert_allclose(out[2], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(out.sum(1), 1.0)
    assert out[0].argmax() == 2 and class_probs[0].argmax() == 1  # the crop's opinion turned the call
    with pytest.raises(ValueError, match=r"\(N, 3\) and \(N, 2\)"):
        combine_class_probs(class_probs, crop[:2])


def test_combine_with_none_by_hand():
    class_probs = np.array([[0.2, 0.5, 0.3],   # lesion 0.8, P(type | lesion) 0.625 / 0.375
                            [0.6, 0.3, 0.1],   # no crop: unchanged
                            [1.0, 0.0, 0.0]])  # no lesion mass: the crop's split of what it leaves
    crop = np.array([[0.6, 0.08, 0.32], [np.nan] * 3, [0.5, 0.1, 0.4]])
    out = combine_none_probs(class_probs, crop)
    normal = (0.2 + 0.6) / 2  # the mean of the network's P(normal) and the crop's P(none)
    benign, malignant = 0.8 * (0.625 + 0.2) / 2, 0.8 * (0.375 + 0.8) / 2  # combine_class_probs on the crop's 0.2/0.8
    np.testing.assert_allclose(out[0], [normal, (1 - normal) * benign / 0.8, (1 - normal) * malignant / 0.8])
    np.testing.assert_allclose(out[0], [0.4, 0.6 * 0.4125, 0.6 * 0.5875])
    np.testing.assert_array_equal(out[1], class_probs[1])
    np.testing.assert_allclose(out[2], [0.75, 0.25 * 0.2, 0.25 * 0.8])
    np.testing.assert_allclose(out.sum(1), 1.0)
    assert class_probs[0].argmax() == 1 and out[0].argmax() == 0  # the crop's "none" turned the call
    with pytest.raises(ValueError, match=r"\(N, 3\) and \(N, 3\)"):
        combine_none_probs(class_probs, crop[:, :2])


def test_settings_classes_follow_normal_boxes():
    assert CropSettings().classes == ("benign", "malignant")
    assert CropSettings(normal_boxes=3).classes == NONE_CLASSES == ("none", "benign", "malignant")


@pytest.mark.parametrize("kwargs, text", [
    ({"size": 8}, "size=8"),
    ({"normal_boxes": -1}, "normal_boxes=-1"),
    ({"normal_boxes": 1.5}, "normal_boxes=1.5"),
    ({"train_margin": (3.0, 1.2)}, "train_margin"),
    ({"test_margins": ()}, "test_margins"),
    ({"jitter": 0.5}, "jitter=0.5"),
    ({"epochs": 0}, "epochs=0"),
])
def test_settings_out_of_range_are_named(kwargs, text):
    with pytest.raises(CropClassifierError, match=text):
        CropSettings(**kwargs)


def _scans(n: int, seed: int):
    """Grey scans of different sizes, each with one square lesion: bright = benign (0), dark = malignant (1)."""
    g = np.random.default_rng(seed)
    images, boxes, labels = [], [], []
    for i in range(n):
        h, w = int(g.integers(80, 160)), int(g.integers(80, 160))
        image = np.clip(g.normal(128, 12, (h, w)), 0, 255).astype(np.uint8)
        side = int(g.integers(12, 40))
        y, x = int(g.integers(0, h - side)), int(g.integers(0, w - side))
        label = i % 2
        image[y:y + side, x:x + side] = 40 if label else 220
        images.append(image)
        boxes.append((y + side / 2, x + side / 2, float(side)))
        labels.append(label)
    return images, boxes, labels


SMALL = CropSettings(size=32, epochs=12, batch_size=8, lr=3e-3)


def test_training_learns_is_seeded_and_records_its_images(tmp_path):
    images, boxes, labels = _scans(24, seed=0)
    names = [f"x/{i}.png" for i in range(24)]
    losses = []
    model, history = train_crop_classifier(images, boxes, labels, SMALL, names,
                                           on_epoch=lambda epoch, loss: losses.append((epoch, loss)))
    assert [e for e, _ in losses] == list(range(SMALL.epochs)) and [v for _, v in losses] == history
    assert history[-1] < history[0]
    assert model.trained_on == names
    test_images, test_boxes, test_labels = _scans(20, seed=1)  # other scans, other sizes
    probs = model.lesion_probs(test_images, test_boxes)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert (probs.argmax(1) == np.array(test_labels)).mean() >= 0.9
    # evaluating right after training rounds exactly as the network read back from its file
    loaded = load_crop_classifier(save_crop_classifier(model, tmp_path / "c.pt"))
    np.testing.assert_array_equal(loaded.lesion_probs(test_images, test_boxes), probs)
    again, _ = train_crop_classifier(images, boxes, labels, SMALL, names)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_training_refusals():
    images, boxes, labels = _scans(4, seed=0)
    with pytest.raises(CropClassifierError, match=r"every class \['benign', 'malignant'\]; got \['benign'\]"):
        train_crop_classifier(images, boxes, [0, 0, 0, 0], SMALL)
    with pytest.raises(CropClassifierError, match="non-empty mask"):
        train_crop_classifier(images, [None, *boxes[1:]], labels, SMALL)
    with pytest.raises(CropClassifierError, match=r"start=network: it needs the network's encoder weights"):
        train_crop_classifier(images, boxes, labels, CropSettings(size=32, epochs=1, start="network"))
    with pytest.raises(CropClassifierError, match="encoder weights given .init. to a classifier from scratch"):
        train_crop_classifier(images, boxes, labels, SMALL, init=make_net(2).state_dict())


def _encoder(arch: str, in_channels: int) -> dict[str, torch.Tensor]:
    import segmentation_models_pytorch as smp

    return smp.encoders.get_encoder(arch, in_channels=in_channels, weights=None).state_dict()


def test_a_classifier_starts_from_an_encoder_of_its_arch():
    """start=network: every weight but the last layer's is the encoder's (smp's ResNet encoder holds
    torchvision's keys); a three-channel encoder's first filters are summed for the grey scan; another arch is
    refused, naming the first weight that does not fit."""
    encoder = _encoder("resnet18", 3)
    net = make_net(3, "resnet18")
    fc = net.fc.weight.detach().clone()
    start_from_encoder(net, encoder, "resnet18")
    own = net.state_dict()
    torch.testing.assert_close(own["conv1.weight"], encoder["conv1.weight"].sum(dim=1, keepdim=True))
    for key in ("layer4.1.conv2.weight", "layer1.0.bn1.running_mean", "bn1.bias"):
        torch.testing.assert_close(own[key], encoder[key])
    torch.testing.assert_close(own["fc.weight"], fc)  # the new 3-class layer keeps its random start
    # a ResNet-18 encoder fits a ResNet-34's first blocks, not its third block of layer1
    with pytest.raises(CropClassifierError, match=r"the network's encoder is not a resnet34 \(its layer1.2.\S+: missing"):
        start_from_encoder(make_net(3, "resnet34"), _encoder("resnet18", 1), "resnet34")
    with pytest.raises(CropClassifierError, match="not a resnet18"):
        start_from_encoder(make_net(3, "resnet18"), _encoder("resnet50", 1), "resnet18")
    with pytest.raises(CropClassifierError, match=r"arch='vgg16' \(one of resnet18, resnet34, resnet50\)"):
        CropSettings(arch="vgg16")
    with pytest.raises(CropClassifierError, match=r"start='imagenet' \(one of scratch, network\)"):
        CropSettings(start="imagenet")


def test_training_from_an_encoder_keeps_it_where_nothing_is_learnt():
    """``init`` is what training starts from: with a learning rate too small to move them, the trained
    classifier's weights are the encoder's (a classifier trained from scratch shares none of them)."""
    images, boxes, labels = _scans(8, seed=0)
    encoder = _encoder("resnet18", 1)
    settings = CropSettings(size=32, epochs=1, batch_size=8, lr=1e-12, weight_decay=0.0, start="network")
    model, _ = train_crop_classifier(images, boxes, labels, settings, init=encoder)
    torch.testing.assert_close(model.net.state_dict()["layer3.0.conv1.weight"], encoder["layer3.0.conv1.weight"])
    scratch, _ = train_crop_classifier(images, boxes, labels, CropSettings(size=32, epochs=1, batch_size=8))
    assert not torch.allclose(scratch.net.state_dict()["layer3.0.conv1.weight"], encoder["layer3.0.conv1.weight"])


def test_three_classes_train_read_round_trip_and_refine(tmp_path):
    """The crop stage with normal_boxes (none, benign, malignant): (N, 3) probabilities, its classes kept in its
    file, joined with the network's by combine_none_probs; a class set the stage does not know is refused."""
    images, boxes, _ = _scans(6, seed=4)
    classes = NONE_CLASSES
    with pytest.raises(CropClassifierError, match=r"every class \['none', 'benign', 'malignant'\]"):
        train_crop_classifier(images, boxes, [0, 1, 0, 1, 0, 1], SMALL, classes=classes)
    model, _ = train_crop_classifier(images, boxes, [0, 1, 2, 0, 1, 2], SMALL, classes=classes)
    probs = model.lesion_probs(images, boxes)
    assert probs.shape == (6, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    loaded = load_crop_classifier(save_crop_classifier(model, tmp_path / "three.pt"))
    assert loaded.classes == classes
    np.testing.assert_array_equal(loaded.lesion_probs(images, boxes), probs)
    masks = [np.zeros(im.shape, np.float32) for im in images]
    for mask, (cy, cx, side) in zip(masks[:4], boxes):  # the last two draw nothing
        mask[int(cy - side / 2):int(cy + side / 2), int(cx - side / 2):int(cx + side / 2)] = 0.9
    class_probs = np.tile([[0.5, 0.3, 0.2]], (6, 1))
    combined, crop = loaded.refine(images, masks, class_probs)
    assert crop.shape == (6, 3) and np.isnan(crop[4:]).all() and not np.isnan(crop[:4]).any()
    np.testing.assert_allclose(crop[:4], probs[:4], atol=1e-6)  # read on the drawn masks' boxes
    np.testing.assert_allclose(combined, combine_none_probs(class_probs, crop))
    np.testing.assert_array_equal(combined[4:], class_probs[4:])
    other = CropClassifier(SMALL, classes=("lesion", "none"))
    with pytest.raises(CropClassifierError, match=r"does not combine with the network's"):
        other.refine(images, masks, class_probs)


def test_refine_reads_the_largest_component_and_leaves_empty_masks_alone():
    images, _, _ = _scans(3, seed=2)
    model = CropClassifier(CropSettings(size=32))
    masks = [np.zeros(im.shape, np.float32) for im in images]
    masks[0][10:30, 10:30] = 0.9  # one lesion
    masks[1][5:9, 5:9] = 0.9  # a speck and a larger component: the larger one is read
    masks[1][40:70, 40:70] = 0.8
    class_probs = np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    combined, crop = model.refine(images, masks, class_probs)
    assert np.isnan(crop[2]).all() and not np.isnan(crop[:2]).any()
    np.testing.assert_array_equal(combined[2], class_probs[2])
    np.testing.assert_allclose(combined, combine_class_probs(class_probs, crop))
    largest = model.lesion_probs([images[1]], [(55.0, 55.0, 30.0)])
    np.testing.assert_allclose(crop[1], largest[0], atol=1e-6)


def test_file_round_trip_and_refusals(tmp_path):
    images, boxes, _ = _scans(4, seed=3)
    model = CropClassifier(CropSettings(size=32, test_margins=(1.5, 2.0)), ["benign/benign (1).png"])
    path = save_crop_classifier(model, tmp_path / "c.pt", fit_seconds=1.5)
    assert torch.load(path, weights_only=True)["fit_seconds"] == 1.5  # plain values only
    loaded = load_crop_classifier(path)
    assert loaded.settings == model.settings and loaded.trained_on == model.trained_on
    np.testing.assert_allclose(loaded.lesion_probs(images, boxes), model.lesion_probs(images, boxes), atol=1e-6)

    with pytest.raises(CropClassifierError, match=r"nope.pt: crop classifier not found"):
        load_crop_classifier(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a file torch reads")
    with pytest.raises(CropClassifierError, match=r"junk.pt: not a readable crop-classifier file"):
        load_crop_classifier(tmp_path / "junk.pt")
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "net.ckpt")
    with pytest.raises(CropClassifierError, match=r"net.ckpt: not a busiseg crop classifier.*ckpt_path="):
        load_crop_classifier(tmp_path / "net.ckpt")
    with pytest.raises(CropClassifierError, match=r"c.pt: the crop classifier was trained on 1 of the 2 images"):
        check_not_trained_on(loaded, ["benign/benign (1).png", "benign/benign (2).png"], path)
    check_not_trained_on(loaded, ["benign/benign (2).png"], path)

"""Losses: hand-computed values, gradients and config validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from busiseg.data.labels import NUM_CLASSES
from busiseg.models.losses import (
    ClassificationLoss,
    FixedWeighting,
    MultiTaskLoss,
    SegmentationLoss,
    SegOnlyWeighting,
    TaskWeighting,
    UncertaintyWeighting,
)


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# --------------------------------------------------------------------------------------------- segmentation


def test_segmentation_loss_hand_computed_value():
    # One 2x2 image, logits 0 everywhere -> p = 0.5 on all 4 pixels; the mask has 2 pixels on.
    # sum(p*t) = 1, sum(p) = 2, sum(t) = 2, smooth = 1 -> dice = (2*1 + 1) / (2 + 2 + 1) = 3/5, dice loss = 2/5.
    # BCE at p = 0.5 is ln 2 on every pixel.
    logits = torch.zeros(1, 1, 2, 2)
    masks = _t([[[[1, 0], [1, 0]]]])
    loss = SegmentationLoss(dice_weight=1.0, bce_weight=1.0, smooth=1.0)
    assert_close(loss(logits, masks), _t(0.4 + math.log(2)))
    assert_close(SegmentationLoss(dice_weight=1.0, bce_weight=0.0)(logits, masks), _t(0.4))
    assert_close(SegmentationLoss(dice_weight=0.0, bce_weight=1.0)(logits, masks), _t(math.log(2)))
    assert_close(SegmentationLoss(dice_weight=2.0, bce_weight=0.5)(logits, masks), _t(0.8 + 0.5 * math.log(2)))


def test_segmentation_dice_is_aggregated_over_the_batch():
    # Image 1: empty mask; image 2: full mask; logits 0 -> p = 0.5 on all 8 pixels.
    # Batch-aggregated: sum(p*t) = 4*0.5 = 2, sum(p) = 4, sum(t) = 4 -> dice = (4 + 1) / (8 + 1) = 5/9, loss 4/9.
    # (Per-image then averaged would give 1 - ((0+1)/(2+0+1) + (4+1)/(2+4+1)) / 2 = 10/21 instead.)
    logits = torch.zeros(2, 1, 2, 2)
    masks = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    dice_only = SegmentationLoss(dice_weight=1.0, bce_weight=0.0, smooth=1.0)
    assert_close(dice_only(logits, masks), _t(4 / 9))


def test_segmentation_dice_per_lesion_image():
    # Three 2x2 images, logits 0 -> p = 0.5 everywhere. Image 0: empty mask (no Dice term);
    # image 1: 1 lesion pixel -> (2*0.5 + 1) / (2 + 1 + 1) = 1/2; image 2: full -> (2*2 + 1) / (2 + 4 + 1) = 5/7.
    # lesion_images: 1 - (1/2 + 5/7) / 2 = 11/28. Batch-aggregated: (2*2.5 + 1) / (6 + 5 + 1) = 1/2 -> 1/2.
    logits = torch.zeros(3, 1, 2, 2)
    masks = torch.zeros(3, 1, 2, 2)
    masks[1, 0, 0, 0] = 1
    masks[2] = 1
    per_image = SegmentationLoss(dice_weight=1.0, bce_weight=0.0, smooth=1.0, dice_reduction="lesion_images")
    assert_close(per_image(logits, masks), _t(11 / 28))
    assert_close(SegmentationLoss(dice_weight=1.0, bce_weight=0.0, smooth=1.0)(logits, masks), _t(1 / 2))
    # a batch without lesions falls back to the batch-aggregated Dice: (0 + 1) / (6 + 0 + 1)
    empty = torch.zeros(3, 1, 2, 2)
    assert_close(per_image(logits, empty), _t(1 - 1 / 7))
    # the 1-pixel lesion missed, the 4-pixel one hit: per image (1 - (0 + 1) / (1 + 1)) / 2 = 1/4, where the
    # batch sum barely notices it: 1 - (2*4 + 1) / (4 + 5 + 1) = 1/10
    hit_big = torch.where(masks.bool(), 30.0, -30.0)
    hit_big[1] = -30.0
    assert_close(per_image(hit_big, masks), _t(1 / 4))
    assert_close(SegmentationLoss(dice_weight=1.0, bce_weight=0.0, smooth=1.0)(hit_big, masks), _t(1 / 10))
    with pytest.raises(ValueError, match="loss.segmentation.dice_reduction"):
        SegmentationLoss(dice_reduction="image")


def test_segmentation_loss_near_zero_for_perfect_and_large_for_inverted_logits():
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, 2:5, 3:7] = 1
    masks[1, 0, 0:2, 0:8] = 1
    perfect = 20.0 * (2 * masks - 1)
    loss = SegmentationLoss()
    assert loss(perfect, masks).item() < 1e-4
    inverted = -perfect
    # Dice term ~ 1 - 1/(N+1) and BCE ~ 20 per pixel.
    assert loss(inverted, masks).item() > 10.0


def test_segmentation_loss_empty_masks_confident_background_is_zero():
    # A batch of "normal" images only: the smoothed Dice is defined and ~0 for a confident empty prediction.
    masks = torch.zeros(3, 1, 4, 4)
    loss = SegmentationLoss()
    assert loss(torch.full_like(masks, -20.0), masks).item() < 1e-4
    assert loss(torch.full_like(masks, 20.0), masks).item() > 10.0


def test_segmentation_loss_accepts_masks_without_channel_dim_and_rejects_bad_shapes():
    logits = torch.randn(2, 1, 4, 4)
    masks = (torch.rand(2, 1, 4, 4) > 0.5).float()
    loss = SegmentationLoss()
    assert_close(loss(logits, masks.squeeze(1)), loss(logits, masks))
    with pytest.raises(ValueError, match="do not match"):
        loss(logits, masks[:, :, :2])


def test_focal_term_hand_computed_and_equal_to_bce_at_gamma_zero():
    # logits 0 -> p_t = 0.5 on every pixel, BCE = ln 2, focal = (1 - 0.5)^2 * ln 2 = ln 2 / 4.
    logits = torch.zeros(1, 1, 2, 2)
    masks = _t([[[[1, 0], [1, 0]]]])
    focal = SegmentationLoss(dice_weight=0.0, bce_weight=0.0, focal_weight=1.0, focal_gamma=2.0)
    assert_close(focal(logits, masks), _t(math.log(2) / 4))
    logits = torch.randn(2, 1, 5, 5)
    masks = (torch.rand(2, 1, 5, 5) > 0.6).float()
    bce = SegmentationLoss(dice_weight=0.0, bce_weight=1.0)
    assert_close(SegmentationLoss(dice_weight=0.0, bce_weight=0.0, focal_weight=1.0, focal_gamma=0.0)(logits, masks),
                 bce(logits, masks))
    # easy pixels (right with logit 3) count far less than under BCE
    easy = 3.0 * (2 * masks - 1)
    assert focal(easy, masks) < bce(easy, masks) / 10


def test_lovasz_term_hand_computed():
    # 2 pixels, mask (1, 0), logits (1, 1): hinge errors 1 - 1*(+1) = 0 and 1 - 1*(-1) = 2; sorted (2, 0) with
    # labels (0, 1): union (1+1, 1+1) = 2, intersection (1, 0) -> jaccard (0.5, 1), gradient (0.5, 0.5);
    # loss = 2 * 0.5 + 0 * 0.5 = 1.
    lovasz = SegmentationLoss(dice_weight=0.0, bce_weight=0.0, lovasz_weight=1.0)
    assert_close(lovasz(_t([[[[1.0, 1.0]]]]), _t([[[[1, 0]]]])), _t(1.0))
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 6, 6)
    masks = (torch.rand(3, 1, 6, 6) > 0.5).float()
    masks[0] = 0  # a "normal" image in the batch
    assert lovasz(logits, masks).item() > 0
    # confident and right costs nothing; the term backpropagates
    assert lovasz(10 * (2 * masks - 1), masks).item() == 0.0
    logits.requires_grad_(True)
    lovasz(logits, masks).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_segmentation_loss_terms_add_up():
    logits = torch.randn(2, 1, 4, 4)
    masks = (torch.rand(2, 1, 4, 4) > 0.5).float()
    parts = [SegmentationLoss(dice_weight=1.0, bce_weight=0.0), SegmentationLoss(dice_weight=0.0, bce_weight=1.0),
             SegmentationLoss(dice_weight=0.0, bce_weight=0.0, focal_weight=1.0),
             SegmentationLoss(dice_weight=0.0, bce_weight=0.0, lovasz_weight=1.0)]
    weights = (1.0, 0.5, 2.0, 0.25)
    whole = SegmentationLoss(dice_weight=1.0, bce_weight=0.5, focal_weight=2.0, lovasz_weight=0.25)
    assert_close(whole(logits, masks), sum(w * part(logits, masks) for w, part in zip(weights, parts)))
    assert "focal_weight=2.0" in repr(whole) and "lovasz_weight=0.25" in repr(whole)


def test_segmentation_loss_negative_weight_raises():
    with pytest.raises(ValueError, match="dice_weight"):
        SegmentationLoss(dice_weight=-1.0)
    with pytest.raises(ValueError, match="bce_weight"):
        SegmentationLoss(bce_weight=-0.1)
    with pytest.raises(ValueError, match="focal_weight"):
        SegmentationLoss(focal_weight=-1.0)
    with pytest.raises(ValueError, match="lovasz_weight"):
        SegmentationLoss(lovasz_weight=float("nan"))


# ------------------------------------------------------------------------------------------- classification


def test_mse_classification_loss_hand_computed():
    # Sample 1: logits (0, 0, 0) -> p = (1/3, 1/3, 1/3), label 0, one-hot (1, 0, 0):
    #   squared errors (2/3)^2 + (1/3)^2 + (1/3)^2 = 6/9, mean over 3 classes = 2/9.
    # Sample 2: logits (ln 2, 0, 0) -> p = (1/2, 1/4, 1/4), label 2, one-hot (0, 0, 1):
    #   squared errors 1/4 + 1/16 + 9/16 = 7/8, mean over classes = 7/24.
    # Mean over the batch: (2/9 + 7/24) / 2 = (16/72 + 21/72) / 2 = 37/144.
    logits = _t([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    loss = ClassificationLoss(kind="mse", num_classes=3)
    assert_close(loss(logits, labels), _t(37 / 144))
    # Same as the definition spelled with torch.
    expected = F.mse_loss(logits.softmax(1), F.one_hot(labels, 3).float())
    assert_close(loss(logits, labels), expected)


def test_mse_classification_loss_with_class_weights():
    # Weights (1, 1, 3): sum(w_i * l_i) / sum(w_i) = (1 * 2/9 + 3 * 7/24) / (1 + 3) = (16/72 + 63/72) / 4 = 79/288.
    logits = _t([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    loss = ClassificationLoss(kind="mse", class_weights=[1.0, 1.0, 3.0])
    assert_close(loss(logits, labels), _t(79 / 288))


def test_ce_classification_loss_equals_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(5, NUM_CLASSES)
    labels = torch.tensor([0, 1, 2, 2, 1])
    assert_close(ClassificationLoss(kind="ce")(logits, labels), F.cross_entropy(logits, labels))
    weights = [0.5, 1.0, 2.0]
    assert_close(
        ClassificationLoss(kind="ce", class_weights=weights)(logits, labels),
        F.cross_entropy(logits, labels, weight=torch.tensor(weights)),
    )


@pytest.mark.parametrize("kind", ["mse", "ce"])
@pytest.mark.parametrize("weights", [None, [0.5, 1.0, 2.0]])
def test_class_probability_targets(kind, weights):
    torch.manual_seed(1)
    logits = torch.randn(5, NUM_CLASSES)
    labels = torch.tensor([0, 1, 2, 2, 1])
    loss = ClassificationLoss(kind=kind, class_weights=weights)
    # one-hot probabilities (an unmixed sample of a mixed batch) give exactly the class-index loss
    assert_close(loss(logits, F.one_hot(labels, NUM_CLASSES).float()), loss(logits, labels))
    # a 50/50 target is the mean of the two one-hot losses when the weights are equal
    half = 0.5 * F.one_hot(labels, NUM_CLASSES).float() + 0.5 * F.one_hot(labels.roll(1), NUM_CLASSES).float()
    if weights is None:
        assert_close(loss(logits, half), 0.5 * loss(logits, labels) + 0.5 * loss(logits, labels.roll(1))
                     if kind == "ce" else F.mse_loss(logits.softmax(1), half))
    with pytest.raises(ValueError, match="class targets of shape"):
        loss(logits, torch.rand(5, 2))


def test_classification_loss_unknown_kind_names_allowed_values():
    with pytest.raises(ValueError) as err:
        ClassificationLoss(kind="focal")
    msg = str(err.value)
    assert "'mse'" in msg and "'ce'" in msg and "focal" in msg


def test_classification_loss_bad_class_weights():
    with pytest.raises(ValueError, match="class_weights"):
        ClassificationLoss(class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="class_weights"):
        ClassificationLoss(class_weights=[1.0, -2.0, 1.0])


def test_class_weights_follow_the_module_device_and_state_dict():
    loss = ClassificationLoss(kind="ce", class_weights=[1.0, 2.0, 3.0])
    assert "class_weights" in loss.state_dict()
    assert loss.double().class_weights.dtype == torch.float64
    assert "class_weights" not in ClassificationLoss().state_dict()


# ------------------------------------------------------------------------------------------------ weighting


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask_logits = torch.randn(2, 1, 4, 4, generator=g, requires_grad=True)
    class_logits = torch.randn(2, NUM_CLASSES, generator=g, requires_grad=True)
    masks = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    labels = torch.tensor([1, 2])
    return mask_logits, class_logits, masks, labels


def test_fixed_weighting_total_and_extras():
    mask_logits, class_logits, masks, labels = _inputs()
    seg, cls = SegmentationLoss(), ClassificationLoss(kind="mse")
    mtl = MultiTaskLoss(seg, cls, FixedWeighting(w_seg=0.7, w_cls=2.0))
    out = mtl(mask_logits, class_logits, masks, labels)
    assert set(out) == {"loss", "seg_loss", "cls_loss", "w_seg", "w_cls"}
    assert_close(out["seg_loss"], seg(mask_logits, masks))
    assert_close(out["cls_loss"], cls(class_logits, labels))
    assert_close(out["loss"], 0.7 * out["seg_loss"] + 2.0 * out["cls_loss"])
    assert_close(out["w_seg"], _t(0.7))
    assert_close(out["w_cls"], _t(2.0))
    for value in out.values():
        assert value.dim() == 0


def test_seg_only_total_is_seg_loss_and_cls_gets_no_gradient():
    mask_logits, class_logits, masks, labels = _inputs()
    mtl = MultiTaskLoss(SegmentationLoss(), ClassificationLoss(kind="mse"), SegOnlyWeighting())
    out = mtl(mask_logits, class_logits, masks, labels)
    assert_close(out["loss"], out["seg_loss"])
    assert_close(out["w_cls"], _t(0.0))
    # The classification loss is still computed (for logging) ...
    assert out["cls_loss"].item() > 0
    # ... but it is not part of the optimized total.
    out["loss"].backward()
    assert mask_logits.grad is not None and mask_logits.grad.abs().sum() > 0
    assert class_logits.grad is None


def test_seg_only_total_survives_a_non_finite_classification_loss():
    total, _ = SegOnlyWeighting()(_t(0.25), _t(float("nan")))
    assert_close(total, _t(0.25))


def test_uncertainty_weighting_matches_formula_and_gets_gradients():
    s_seg, s_cls = 0.3, -0.2
    weighting = UncertaintyWeighting(init_log_var_seg=s_seg, init_log_var_cls=s_cls)
    mask_logits, class_logits, masks, labels = _inputs(1)
    mtl = MultiTaskLoss(SegmentationLoss(), ClassificationLoss(kind="ce"), weighting)
    out = mtl(mask_logits, class_logits, masks, labels)
    l_seg, l_cls = out["seg_loss"].item(), out["cls_loss"].item()
    expected = (
        0.5 * math.exp(-s_seg) * l_seg + 0.5 * s_seg + 0.5 * math.exp(-s_cls) * l_cls + 0.5 * s_cls
    )
    assert_close(out["loss"], _t(expected))
    assert_close(out["w_seg"], _t(math.exp(-s_seg)))
    assert_close(out["w_cls"], _t(math.exp(-s_cls)))
    assert_close(out["log_var_seg"], _t(s_seg))
    assert not out["w_seg"].requires_grad

    out["loss"].backward()
    # d total / d s = -0.5 * exp(-s) * L + 0.5
    assert weighting.log_var_seg.grad is not None and weighting.log_var_cls.grad is not None
    assert_close(weighting.log_var_seg.grad, _t(-0.5 * math.exp(-s_seg) * l_seg + 0.5))
    assert_close(weighting.log_var_cls.grad, _t(-0.5 * math.exp(-s_cls) * l_cls + 0.5))
    assert class_logits.grad is not None and mask_logits.grad is not None
    # The learnable weights are parameters of the MultiTaskLoss, so they reach an optimizer built from it.
    names = {n for n, _ in mtl.named_parameters()}
    assert names == {"weighting.log_var_seg", "weighting.log_var_cls"}


def test_uncertainty_weighting_init_is_half_the_sum():
    total, extras = UncertaintyWeighting()(_t(1.5), _t(0.5))
    assert_close(total, _t(1.0))
    assert_close(extras["w_seg"], _t(1.0))
    assert_close(extras["w_cls"], _t(1.0))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"w_seg": -1.0}, "loss.w_seg"), ({"w_cls": -0.5}, "loss.w_cls"), ({"w_seg": float("nan")}, "loss.w_seg")],
)
def test_fixed_weighting_negative_weight_raises_naming_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        FixedWeighting(**kwargs)


def test_seg_only_negative_weight_raises_naming_key():
    with pytest.raises(ValueError, match=r"loss\.w_seg"):
        SegOnlyWeighting(w_seg=-1.0)


def test_fixed_weighting_both_zero_raises():
    with pytest.raises(ValueError, match="both 0"):
        FixedWeighting(w_seg=0.0, w_cls=0.0)


def test_task_weighting_base_is_abstract():
    with pytest.raises(NotImplementedError):
        TaskWeighting()(_t(1.0), _t(1.0))


def test_hydra_instantiates_the_nested_loss_config():
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        {
            "_target_": "busiseg.models.losses.MultiTaskLoss",
            "segmentation": {"_target_": "busiseg.models.losses.SegmentationLoss", "dice_weight": 1.0},
            "classification": {
                "_target_": "busiseg.models.losses.ClassificationLoss",
                "kind": "ce",
                "class_weights": [1.0, 2.0, 3.0],
            },
            "weighting": {"_target_": "busiseg.models.losses.UncertaintyWeighting"},
        }
    )
    mtl = hydra_utils.instantiate(cfg)
    assert isinstance(mtl, MultiTaskLoss)
    assert isinstance(mtl.weighting, UncertaintyWeighting)
    assert_close(mtl.classification.class_weights, _t([1.0, 2.0, 3.0]))
    out = mtl(*_inputs())
    assert torch.isfinite(out["loss"])


def test_deep_supervision_loss_weights_halve_and_sum_to_one():
    mask_logits, class_logits, masks, labels = _inputs()
    g = torch.Generator().manual_seed(1)
    aux_full = torch.randn(2, 1, 4, 4, generator=g)  # already at mask size: used as it is
    aux_half = torch.randn(2, 1, 2, 2, generator=g)  # upsampled (bilinear) to 4x4 before the loss
    seg, cls = SegmentationLoss(), ClassificationLoss(kind="mse")
    mtl = MultiTaskLoss(seg, cls, FixedWeighting(w_seg=1.0, w_cls=1.0))
    out = mtl(mask_logits, class_logits, masks, labels, aux_mask_logits=[aux_full, aux_half])
    up = torch.nn.functional.interpolate(aux_half, size=(4, 4), mode="bilinear", align_corners=False)
    expected = (4 * seg(mask_logits, masks) + 2 * seg(aux_full, masks) + seg(up, masks)) / 7  # 1, 1/2, 1/4
    assert_close(out["seg_loss"], expected)
    assert_close(out["seg_loss_final"], seg(mask_logits, masks))
    assert_close(out["loss"], expected + out["cls_loss"])
    # without aux outputs nothing changes, and there is no seg_loss_final
    plain = mtl(mask_logits, class_logits, masks, labels)
    assert "seg_loss_final" not in plain and torch.equal(plain["seg_loss"], out["seg_loss_final"])

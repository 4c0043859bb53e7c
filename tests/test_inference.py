from __future__ import annotations

import numpy as np
import pytest
import torch

from busiseg.inference import Ensemble, InferenceOptions, postprocess_mask, predict_probs, prepare_image, restore_size


class MirrorNet(torch.nn.Module):
    """Mask logit = image - 0.5 (so the mask is the bright pixels); class from the mean."""

    def forward(self, x):
        mask_logits = (x[:, :1] - 0.5) * 20
        m = x.mean(dim=(1, 2, 3))
        return mask_logits, torch.stack([m, 1 - m, torch.zeros_like(m)], dim=1) * 10


def test_prepare_image_shapes():
    assert prepare_image(np.zeros((50, 70), np.uint8), 64).shape == (1, 64, 64)
    t = prepare_image(np.full((50, 70, 3), 255, np.uint8), 32)
    assert t.shape == (3, 32, 32) and float(t.max()) == 1.0


def test_flip_tta_is_exact_for_an_equivariant_net():
    x = torch.rand(2, 1, 64, 64)
    plain, cls_plain = predict_probs(MirrorNet(), x, InferenceOptions())
    tta, cls_tta = predict_probs(MirrorNet(), x, InferenceOptions(tta_flip=True, tta_scales=[1.0]))
    torch.testing.assert_close(plain, tta)
    torch.testing.assert_close(cls_plain, cls_tta)


class RampNet(torch.nn.Module):
    """Not flip-equivariant: mask logit = image x a left-to-right ramp; class logits from the left half's mean."""

    def forward(self, x):
        ramp = torch.linspace(-4, 4, x.shape[-1])
        left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        return x[:, :1] * ramp, torch.stack([left, 1 - left, torch.zeros_like(left)], dim=1) * 10


def test_flip_tta_averages_the_plain_and_the_mirrored_view():
    """The flipped view is added and mapped back: a TTA that skipped it passed the equivariant test above."""
    x = torch.rand(2, 1, 32, 32)
    net = RampNet()
    plain, cls_plain = predict_probs(net, x, InferenceOptions())
    tta, cls_tta = predict_probs(net, x, InferenceOptions(tta_flip=True, tta_scales=[1.0]))
    flipped, cls_flipped = predict_probs(net, torch.flip(x, dims=[-1]), InferenceOptions())
    torch.testing.assert_close(tta, (plain + torch.flip(flipped, dims=[-1])) / 2)
    torch.testing.assert_close(cls_tta, (cls_plain + cls_flipped) / 2)
    assert not torch.allclose(tta, plain, atol=1e-3)


class ShiftedNet(MirrorNet):
    """MirrorNet with its mask logits shifted and class logits permuted: another member."""

    def forward(self, x):
        mask_logits, class_logits = super().forward(x)
        return mask_logits - 3.0, class_logits[:, [2, 0, 1]]


def test_ensemble_averages_probabilities():
    x = torch.rand(3, 1, 32, 32)
    a_mask, a_cls = predict_probs(MirrorNet(), x)
    b_mask, b_cls = predict_probs(ShiftedNet(), x)
    ensemble = Ensemble([MirrorNet(), ShiftedNet()])
    mask, cls = predict_probs(ensemble, x)
    torch.testing.assert_close(mask, (a_mask + b_mask) / 2)
    torch.testing.assert_close(cls, (a_cls + b_cls) / 2)
    assert not torch.allclose(a_mask, b_mask)  # the members differ, so the average is a real one
    # forward: logits of the averages, for code that expects a network
    mask_logits, class_logits = ensemble(x)
    torch.testing.assert_close(torch.sigmoid(mask_logits), mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.softmax(class_logits, dim=1), cls)
    # with TTA: the members' TTA views averaged as well
    tta = InferenceOptions(tta_flip=True)
    torch.testing.assert_close(predict_probs(ensemble, x, tta)[0],
                               (predict_probs(MirrorNet(), x, tta)[0] + predict_probs(ShiftedNet(), x, tta)[0]) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        Ensemble([MirrorNet()])


def test_scale_tta_returns_input_size():
    x = torch.rand(1, 1, 64, 96)
    mask, cls = predict_probs(MirrorNet(), x, InferenceOptions(tta_scales=[0.5, 1.5]))
    assert mask.shape == (1, 1, 64, 96) and cls.shape == (1, 3)
    torch.testing.assert_close(cls.sum(dim=1), torch.ones(1))


def test_restore_size():
    p = np.zeros((32, 32), np.float32)
    p[8:24, 8:24] = 1.0
    big = restore_size(p, (100, 60))
    assert big.shape == (100, 60)
    assert abs((big >= 0.5).mean() - 0.25) < 0.03


def _blobs():
    prob = np.zeros((40, 40), np.float32)
    prob[5:25, 5:25] = 0.9  # big component with a hole
    prob[12:16, 12:16] = 0.1
    prob[30:33, 30:33] = 0.8  # small component, 9 px
    return prob


def test_postprocess_steps():
    prob = _blobs()
    plain = postprocess_mask(prob, None, InferenceOptions())
    assert plain.sum() == 400 - 16 + 9
    assert postprocess_mask(prob, None, InferenceOptions(min_component_px=10)).sum() == 400 - 16
    assert postprocess_mask(prob, None, InferenceOptions(fill_holes=True)).sum() == 400 + 9
    assert postprocess_mask(prob, None, InferenceOptions(keep_largest=True, fill_holes=True)).sum() == 400


def test_class_gating():
    prob = _blobs()
    gate = InferenceOptions(class_gating=True, normal_threshold=0.6)
    assert not postprocess_mask(prob, np.array([0.7, 0.2, 0.1]), gate).any()
    # normal predicted but below the threshold: mask kept
    assert postprocess_mask(prob, np.array([0.5, 0.3, 0.2]), gate).sum() == plain_sum(prob)
    # lesion predicted, mask empty at threshold: the most probable region is kept
    faint = np.zeros((20, 20), np.float32)
    faint[2:6, 2:6] = 0.3
    faint[10:12, 10:12] = 0.1
    kept = postprocess_mask(faint, np.array([0.1, 0.8, 0.1]), gate)
    assert kept.sum() == 16 and kept[2:6, 2:6].all()


def plain_sum(prob):
    return int((prob >= 0.5).sum())


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="inference.threshold"):
        InferenceOptions(threshold=1.5)
    with pytest.raises(ValueError, match="inference.min_component_px"):
        InferenceOptions(min_component_px=-1)

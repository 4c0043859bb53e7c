from __future__ import annotations

import pytest
import torch

from busiseg.models.net import EncoderWeightsUnavailable, MultiTaskUnet


@pytest.mark.parametrize("in_channels,size", [(1, 64), (3, 96)])
def test_forward_shapes(in_channels: int, size: int):
    net = MultiTaskUnet(encoder_name="resnet18", in_channels=in_channels, decoder_channels=(32, 16, 16, 8, 8))
    mask_logits, class_logits = net(torch.rand(2, in_channels, size, size))
    assert mask_logits.shape == (2, 1, size, size)
    assert class_logits.shape == (2, 3)


def test_default_is_resnet34_from_scratch():
    net = MultiTaskUnet()
    assert net.unet.encoder.__class__.__name__ == "ResNetEncoder"
    assert len(net.unet.encoder.layer1) == 3  # resnet34 has 3 blocks in layer1, resnet18 has 2


def test_unknown_weights_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderWeightsUnavailable) as info:
        MultiTaskUnet(encoder_name="resnet18", encoder_weights="imagenet")
    msg = str(info.value)
    assert "\n" not in msg
    assert "model.encoder_weights=null" in msg and "resnet18" in msg


def test_unknown_encoder_names_key():
    with pytest.raises(ValueError, match="model.encoder_name"):
        MultiTaskUnet(encoder_name="no_such_encoder")

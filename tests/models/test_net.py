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


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """A Hub that does not answer (HF_ENDPOINT on a closed local port) and an empty weight cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_unknown_weights_offline_is_one_clear_error_at_once(no_hub):
    import time

    from huggingface_hub import constants

    started = time.perf_counter()
    with pytest.raises(EncoderWeightsUnavailable) as info:
        MultiTaskUnet(encoder_name="resnet18", encoder_weights="imagenet")
    msg = str(info.value)
    assert "\n" not in msg
    assert "model.encoder_weights=null" in msg and "resnet18" in msg
    assert "127.0.0.1 is unreachable and they are not cached" in msg
    # not after huggingface_hub's five retries (about 25 s); the offline switch is put back
    assert time.perf_counter() - started < 10
    assert constants.HF_HUB_OFFLINE is False


def test_cached_weights_load_without_the_hub(no_hub):
    """Weights downloaded once load on a machine that cannot reach the Hub (read from the cache, no request)."""
    import json

    import segmentation_models_pytorch as smp
    from safetensors.torch import save_file

    settings = smp.encoders.encoders["resnet18"]["pretrained_settings"]["imagenet"]
    torch.manual_seed(3)
    cached = {k: torch.randn_like(v) if v.is_floating_point() else v
              for k, v in smp.encoders.get_encoder("resnet18", in_channels=3).state_dict().items()}
    snapshot = no_hub / f"models--{settings['repo_id'].replace('/', '--')}" / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({}))
    save_file(cached, str(snapshot / "model.safetensors"))
    net = MultiTaskUnet(encoder_name="resnet18", encoder_weights="imagenet")
    loaded = net.unet.encoder.state_dict()
    assert torch.equal(loaded["layer1.0.conv1.weight"], cached["layer1.0.conv1.weight"])
    assert torch.equal(loaded["layer4.1.bn2.weight"], cached["layer4.1.bn2.weight"])


def test_unknown_encoder_names_key():
    with pytest.raises(ValueError, match="model.encoder_name"):
        MultiTaskUnet(encoder_name="no_such_encoder")


def test_deep_supervision_outputs_and_plain_forward_unchanged():
    torch.manual_seed(0)
    net = MultiTaskUnet(encoder_name="resnet18", decoder_channels=(32, 16, 16, 8, 8), deep_supervision=2).eval()
    images = torch.rand(2, 1, 64, 64)
    plain = net(images)
    assert len(plain) == 2
    mask_logits, class_logits, aux = net(images, return_aux=True)
    assert torch.equal(mask_logits, plain[0]) and torch.equal(class_logits, plain[1])
    assert [tuple(a.shape) for a in aux] == [(2, 1, 32, 32), (2, 1, 16, 16)]  # finest first
    # the heads read the blocks before the last: head 0 on a (2, 8, 32, 32) block output
    assert net.aux_heads[0].in_channels == 8 and net.aux_heads[1].in_channels == 16
    # no hook outlives the call (the plain forward, eval and export never run the aux heads)
    assert all(not block._forward_hooks for block in net.unet.decoder.blocks)
    aux[0].sum().backward()
    assert net.aux_heads[0].weight.grad is not None and net.aux_heads[1].weight.grad is None


def test_deep_supervision_off_returns_empty_aux_and_has_no_heads():
    net = MultiTaskUnet(encoder_name="resnet18", decoder_channels=(32, 16, 16, 8, 8))
    assert len(net.aux_heads) == 0
    assert net(torch.rand(1, 1, 64, 64), return_aux=True)[2] == []


@pytest.mark.parametrize("bad", [-1, 5, 1.5])
def test_deep_supervision_bad_value_names_the_key(bad):
    with pytest.raises(ValueError, match="model.deep_supervision"):
        MultiTaskUnet(encoder_name="resnet18", decoder_channels=(32, 16, 16, 8, 8), deep_supervision=bad)


def test_unetplusplus_same_outputs_and_a_different_decoder():
    net = MultiTaskUnet(encoder_name="resnet18", decoder_channels=(32, 16, 16, 8, 8), arch="unetplusplus")
    assert net.unet.__class__.__name__ == "UnetPlusPlus"
    mask_logits, class_logits = net(torch.rand(2, 1, 64, 64))
    assert mask_logits.shape == (2, 1, 64, 64) and class_logits.shape == (2, 3)
    assert torch.all(class_logits == 0)  # the class head starts at uniform probabilities, as with the U-Net
    plain = MultiTaskUnet(encoder_name="resnet18", decoder_channels=(32, 16, 16, 8, 8))
    assert plain.unet.__class__.__name__ == "Unet"
    # the encoder and heads keep their state_dict keys; the decoder's nested blocks are extra
    assert {k for k in plain.state_dict() if not k.startswith("unet.decoder.")} == \
        {k for k in net.state_dict() if not k.startswith("unet.decoder.")}


def test_scse_decoder_attention_same_outputs_and_extra_decoder_weights():
    kwargs = dict(encoder_name="resnet18", decoder_channels=(64, 32, 32, 16, 16))
    plain = MultiTaskUnet(**kwargs)
    for arch in ("unet", "unetplusplus"):
        net = MultiTaskUnet(decoder_attention="scse", arch=arch, **kwargs)
        assert any(m.__class__.__name__ == "SCSEModule" for m in net.unet.decoder.modules())
        mask_logits, class_logits = net.eval()(torch.rand(2, 1, 64, 64))
        assert mask_logits.shape == (2, 1, 64, 64) and class_logits.shape == (2, 3)
    assert not any(m.__class__.__name__ == "SCSEModule" for m in plain.modules())
    net = MultiTaskUnet(decoder_attention="scse", deep_supervision=2, **kwargs)
    assert len(net(torch.rand(2, 1, 64, 64), return_aux=True)[2]) == 2
    # only the decoder gains weights: encoder and heads keep their state_dict keys
    assert {k for k in plain.state_dict() if not k.startswith("unet.decoder.")} == \
        {k for k in net.state_dict() if not k.startswith("unet.decoder.") and not k.startswith("aux_heads.")}
    with pytest.raises(ValueError, match="model.decoder_attention must be null or 'scse', got 'cbam'"):
        MultiTaskUnet(decoder_attention="cbam", **kwargs)
    with pytest.raises(ValueError, match="decoder_attention=scse needs model.decoder_channels of at least 16"):
        MultiTaskUnet(encoder_name="resnet18", decoder_channels=(32, 16, 16, 8, 8), decoder_attention="scse")


def test_unknown_arch_names_the_key():
    with pytest.raises(ValueError, match="model.arch must be one of \\['unet', 'unetplusplus'\\], got 'fpn'"):
        MultiTaskUnet(encoder_name="resnet18", arch="fpn")


def test_deep_supervision_needs_the_unet_decoder():
    with pytest.raises(ValueError, match="model.deep_supervision needs model.arch=unet"):
        MultiTaskUnet(encoder_name="resnet18", decoder_channels=(32, 16, 16, 8, 8), deep_supervision=1,
                      arch="unetplusplus")


def test_lesion_pooled_head_reads_the_mask_and_keeps_the_mask_path():
    torch.manual_seed(0)
    kwargs = dict(encoder_name="resnet18", decoder_channels=(32, 16, 16, 8, 8))
    net = MultiTaskUnet(class_pooling="lesion", **kwargs)
    assert net.unet.classification_head.__class__.__name__ == "LesionPooledHead"
    # 512 averaged + 512 and 256 under the mask + the drawn area
    assert net.unet.classification_head.linear.in_features == 512 + 512 + 256 + 1
    images = torch.rand(2, 1, 64, 64)
    mask_logits, class_logits = net(images)
    assert mask_logits.shape == (2, 1, 64, 64) and torch.all(class_logits == 0)  # zero-initialised, as avg
    # the mask path is smp's: the same weights give the same mask as the plain head
    plain = MultiTaskUnet(**kwargs)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if "classification_head" not in k}, strict=False)
    net.eval(), plain.eval()
    assert torch.allclose(net(images)[0], plain(images)[0])
    # the class logits depend on the mask: a head with weights gives other logits when the mask changes
    torch.nn.init.normal_(net.unet.classification_head.linear.weight)
    head = net.unet.classification_head
    features = net.unet.encoder((images - 0.5) / 0.25)
    assert not torch.allclose(head(features, torch.full_like(mask_logits, -10.0)),
                              head(features, torch.full_like(mask_logits, 10.0)))
    # the class loss does not reach the mask through the head (the mask is detached there)
    net.train()
    mask_logits, class_logits = net(images)
    grad = torch.autograd.grad(class_logits.sum(), net.unet.segmentation_head[0].weight, allow_unused=True)[0]
    assert grad is None


def test_lesion_pooled_head_under_bf16_autocast():
    net = MultiTaskUnet(encoder_name="resnet18", decoder_channels=(32, 16, 16, 8, 8), class_pooling="lesion")
    torch.nn.init.normal_(net.unet.classification_head.linear.weight)
    images = torch.rand(2, 1, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_logits, class_logits = net(images)
    assert class_logits.shape == (2, 3) and torch.isfinite(class_logits.float()).all()
    class_logits.float().sum().backward()
    assert net.unet.classification_head.linear.weight.grad is not None


def test_lesion_pooled_head_with_deep_supervision_and_unetplusplus():
    kwargs = dict(encoder_name="resnet18", decoder_channels=(32, 16, 16, 8, 8), class_pooling="lesion")
    net = MultiTaskUnet(deep_supervision=2, **kwargs).eval()
    mask_logits, class_logits, aux = net(torch.rand(2, 1, 64, 64), return_aux=True)
    assert class_logits.shape == (2, 3) and len(aux) == 2
    pp = MultiTaskUnet(arch="unetplusplus", **kwargs)
    assert pp(torch.rand(1, 1, 64, 64))[1].shape == (1, 3)


def test_unknown_class_pooling_names_the_key():
    with pytest.raises(ValueError, match="model.class_pooling must be one of \\['avg', 'lesion'\\], got 'max'"):
        MultiTaskUnet(encoder_name="resnet18", class_pooling="max")

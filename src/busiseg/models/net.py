"""The network: an smp U-Net (or U-Net++) whose encoder also feeds a 3-class head."""

from __future__ import annotations

from typing import Sequence

import segmentation_models_pytorch as smp
import torch
from torch import nn

from busiseg.data.labels import NUM_CLASSES


class EncoderWeightsUnavailable(RuntimeError):
    """Named pretrained weights could not be fetched (no network, or not cached)."""


# model.arch -> the smp class. Both take the same arguments and return (mask, class) logits with aux_params.
ARCHITECTURES: dict[str, type[smp.Unet] | type[smp.UnetPlusPlus]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,  # nested dense skip paths (Zhou et al. 2018), MT-UNet++'s decoder
}


def build_unet(encoder_name: str, encoder_weights: str | None, in_channels: int, decoder_channels: Sequence[int],
               num_classes: int, head_dropout: float, arch: str = "unet") -> smp.Unet | smp.UnetPlusPlus:
    """smp.Unet (or U-Net++) with ``aux_params`` for the class head; a failed weight download is one clear error."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    kwargs = dict(
        encoder_name=encoder_name,
        in_channels=in_channels,
        classes=1,
        decoder_channels=tuple(decoder_channels),
        aux_params=dict(classes=num_classes, pooling="avg", dropout=head_dropout or None),
    )
    try:
        return ARCHITECTURES[arch](encoder_weights=encoder_weights, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        if encoder_weights is None:
            if isinstance(exc, KeyError) or "encoder" in str(exc).lower():
                raise ValueError(f"model.encoder_name={encoder_name!r} is not an encoder smp knows ({exc})") from exc
            raise
        raise EncoderWeightsUnavailable(
            f"cannot load '{encoder_weights}' weights for encoder {encoder_name} "
            f"({exc.__class__.__name__}); this machine may be offline. Train from scratch with "
            f"model.encoder_weights=null, or download the weights once where there is network "
            f"(they are cached under ~/.cache/huggingface and ~/.cache/torch)."
        ) from exc


class MultiTaskUnet(nn.Module):
    """U-Net for the lesion mask plus a classification head on the encoder's deepest features.

    ``arch="unetplusplus"`` swaps the decoder for U-Net++'s nested skip paths (same encoder,
    head and outputs; the attribute stays ``self.unet`` so checkpoints keep their keys).

    Inputs are images in [0, 1]; they are standardised inside the network with fixed
    ``input_mean``/``input_std`` so data, callbacks and exported models all speak [0, 1].
    ``forward`` returns ``(mask_logits (B,1,H,W), class_logits (B,3))``.

    ``deep_supervision=k`` (0 = off) adds a 1x1-convolution mask head on each of the last ``k``
    decoder blocks before the final one (resolutions 1/2, 1/4, ... of the input).
    ``forward(images, return_aux=True)`` then also returns their logits, finest first, at their
    own resolution; training adds their losses (``MultiTaskLoss``). The plain ``forward`` (eval,
    predict, ONNX export) is unchanged and never runs the extra heads.
    """

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_weights: str | None = None,
        in_channels: int = 1,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        num_classes: int = NUM_CLASSES,
        head_dropout: float = 0.2,
        input_mean: float = 0.5,
        input_std: float = 0.25,
        deep_supervision: int = 0,
        arch: str = "unet",
    ):
        super().__init__()
        if input_std <= 0:
            raise ValueError(f"model.input_std must be > 0, got {input_std}")
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if not isinstance(deep_supervision, int) or not 0 <= deep_supervision < len(decoder_channels):
            raise ValueError(f"model.deep_supervision must be an integer from 0 to {len(decoder_channels) - 1} "
                             f"(decoder blocks before the last), got {deep_supervision!r}")
        if deep_supervision and arch != "unet":
            raise ValueError(f"model.deep_supervision needs model.arch=unet (its heads read the U-Net decoder's "
                             f"blocks), got model.arch={arch!r} with model.deep_supervision={deep_supervision}")
        self.unet = build_unet(encoder_name, encoder_weights, in_channels, decoder_channels, num_classes, head_dropout,
                               arch)
        self.in_channels = in_channels
        self.deep_supervision = deep_supervision
        # aux head k reads decoder block -(k + 2): the block before the last, then the one before it, ...
        self.aux_heads = nn.ModuleList(
            nn.Conv2d(decoder_channels[-(k + 2)], 1, kernel_size=1) for k in range(deep_supervision))
        self._zero_init_class_head()
        self.register_buffer("input_mean", torch.tensor(float(input_mean)), persistent=False)
        self.register_buffer("input_std", torch.tensor(float(input_std)), persistent=False)

    def _zero_init_class_head(self) -> None:
        # Start from uniform class probabilities. With the MSE-on-softmax loss a head that
        # starts (or drifts) saturated gets almost no gradient and never recovers; zero
        # logits at step 0 keep the softmax in its sensitive range.
        linears = [m for m in self.unet.classification_head.modules() if isinstance(m, nn.Linear)]
        nn.init.zeros_(linears[-1].weight)
        nn.init.zeros_(linears[-1].bias)

    def forward(self, images: torch.Tensor, return_aux: bool = False):
        x = (images - self.input_mean) / self.input_std
        if not return_aux or not self.deep_supervision:
            mask_logits, class_logits = self.unet(x)
            return (mask_logits, class_logits, []) if return_aux else (mask_logits, class_logits)
        features: dict[int, torch.Tensor] = {}
        blocks = [self.unet.decoder.blocks[-(k + 2)] for k in range(self.deep_supervision)]  # as aux_heads
        hooks = [block.register_forward_hook(lambda _m, _i, out, k=k: features.__setitem__(k, out))
                 for k, block in enumerate(blocks)]
        try:
            mask_logits, class_logits = self.unet(x)
        finally:
            for hook in hooks:
                hook.remove()
        aux_logits = [head(features[k]) for k, head in enumerate(self.aux_heads)]
        return mask_logits, class_logits, aux_logits

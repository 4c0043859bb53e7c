"""The network: an smp U-Net (or U-Net++) whose encoder also feeds a 3-class head."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager, nullcontext
from typing import Iterator, Sequence
from urllib.parse import urlsplit

import segmentation_models_pytorch as smp
import torch
from torch import nn

from busiseg.data.labels import NUM_CLASSES


class EncoderWeightsUnavailable(RuntimeError):
    """Named pretrained weights could not be fetched (no network, or not cached)."""


def hub_address() -> tuple[str, int]:
    """Host and port of the Hub that smp fetches pretrained encoder weights from (smp-hub/<encoder>.<weights>):
    ``HF_ENDPOINT`` (a mirror) where set, else huggingface.co."""
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub accepts a connection within ``timeout`` seconds."""
    try:
        with socket.create_connection(hub_address(), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def hub_cache_only() -> Iterator[None]:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE``) for the block: cached files load, anything else fails at
    once instead of after its five retries (about 25 s of warnings)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


# model.arch -> the smp class. Both take the same arguments and return (mask, class) logits with aux_params.
ARCHITECTURES: dict[str, type[smp.Unet] | type[smp.UnetPlusPlus]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,  # nested dense skip paths (Zhou et al. 2018), MT-UNet++'s decoder
}


# model.decoder_attention: smp's decoder_attention_type (None, or "scse": spatial and channel
# squeeze-and-excitation on each decoder block's skip concatenation and output)
DECODER_ATTENTIONS = (None, "scse")


def build_unet(encoder_name: str, encoder_weights: str | None, in_channels: int, decoder_channels: Sequence[int],
               num_classes: int, head_dropout: float, arch: str = "unet",
               decoder_attention: str | None = None) -> smp.Unet | smp.UnetPlusPlus:
    """smp.Unet (or U-Net++) with ``aux_params`` for the class head; a failed weight download is one clear error."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if decoder_attention not in DECODER_ATTENTIONS:
        raise ValueError(f"model.decoder_attention must be null or 'scse', got {decoder_attention!r}")
    if decoder_attention == "scse" and min(decoder_channels) < 16:
        # smp's squeeze-and-excitation divides the channels by 16: fewer would leave it no channel
        raise ValueError(f"model.decoder_attention=scse needs model.decoder_channels of at least 16 each, "
                         f"got {list(decoder_channels)}")
    kwargs = dict(
        encoder_name=encoder_name,
        in_channels=in_channels,
        classes=1,
        decoder_channels=tuple(decoder_channels),
        decoder_attention_type=decoder_attention,
        aux_params=dict(classes=num_classes, pooling="avg", dropout=head_dropout or None),
    )
    # no Hub to ask: read the weights from the cache or fail now
    offline = encoder_weights is not None and not hub_reachable()
    try:
        with hub_cache_only() if offline else nullcontext():
            return ARCHITECTURES[arch](encoder_weights=encoder_weights, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        if encoder_weights is None:
            if isinstance(exc, KeyError) or "encoder" in str(exc).lower():
                raise ValueError(f"model.encoder_name={encoder_name!r} is not an encoder smp knows ({exc})") from exc
            raise
        where = f"{hub_address()[0]} is unreachable and they are not cached" if offline else "this machine may be offline"
        raise EncoderWeightsUnavailable(
            f"cannot load '{encoder_weights}' weights for encoder {encoder_name} "
            f"({exc.__class__.__name__}); {where}. Train from scratch with "
            f"model.encoder_weights=null, or download the weights once where there is network "
            f"(they are cached under ~/.cache/huggingface and ~/.cache/torch)."
        ) from exc


# model.class_pooling: what the class head reads from the encoder's features
CLASS_POOLINGS = ("avg", "lesion")


class LesionPooledHead(nn.Module):
    """Class head that also looks where the network draws the lesion.

    Reads the average of the deepest encoder features over the whole image (as smp's ``avg``
    head), the averages of the two deepest stages weighted by the predicted mask probability
    (resized to each stage's grid; the mask is detached, so the class loss does not reshape the
    mask through this path) and the mean mask probability (the drawn area). The weighted
    averages are near zero where nothing is drawn.
    """

    def __init__(self, stage_channels: Sequence[int], num_classes: int, dropout: float):
        super().__init__()
        deep, second = int(stage_channels[-1]), int(stage_channels[-2])
        self.dropout = nn.Dropout(p=dropout) if dropout else nn.Identity()
        self.linear = nn.Linear(2 * deep + second + 1, num_classes)

    def forward(self, features: Sequence[torch.Tensor], mask_logits: torch.Tensor) -> torch.Tensor:
        prob = torch.sigmoid(mask_logits.detach().float())
        pooled = [features[-1].float().mean(dim=(2, 3))]
        depth = len(features) - 1  # features[0] is the input; stage k is at 1/2**k of it
        for stage, factor in ((features[-1], 2 ** depth), (features[-2], 2 ** (depth - 1))):
            w = nn.functional.avg_pool2d(prob, kernel_size=factor)  # a fixed kernel: exports with dynamic H, W
            pooled.append((stage.float() * w).sum(dim=(2, 3)) / (w.sum(dim=(2, 3)) + 1e-3))
        pooled.append(prob.mean(dim=(2, 3)))
        return self.linear(self.dropout(torch.cat(pooled, dim=1)))


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

    ``decoder_attention="scse"`` adds smp's spatial and channel squeeze-and-excitation to every
    decoder block (twice per block: on the upsampled input concatenated with the skip, and on the
    block's output); ``None`` is smp's plain decoder.

    ``class_pooling="lesion"`` replaces smp's average-pooled class head by
    :class:`LesionPooledHead`, which also pools the encoder's features under the predicted mask.
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
        class_pooling: str = "avg",
        decoder_attention: str | None = None,
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
        if class_pooling not in CLASS_POOLINGS:
            raise ValueError(f"model.class_pooling must be one of {list(CLASS_POOLINGS)}, got {class_pooling!r}")
        self.unet = build_unet(encoder_name, encoder_weights, in_channels, decoder_channels, num_classes, head_dropout,
                               arch, decoder_attention)
        self.class_pooling = class_pooling
        if class_pooling == "lesion":
            self.unet.classification_head = LesionPooledHead(self.unet.encoder.out_channels, num_classes,
                                                             head_dropout)
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

    def _unet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.class_pooling == "avg":
            return self.unet(x)
        # smp's forward with the class head reading the mask too (the input-shape check as smp's)
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.unet.check_input_shape(x)
        features = self.unet.encoder(x)
        mask_logits = self.unet.segmentation_head(self.unet.decoder(features))
        return mask_logits, self.unet.classification_head(features, mask_logits)

    def forward(self, images: torch.Tensor, return_aux: bool = False):
        x = (images - self.input_mean) / self.input_std
        if not return_aux or not self.deep_supervision:
            mask_logits, class_logits = self._unet(x)
            return (mask_logits, class_logits, []) if return_aux else (mask_logits, class_logits)
        features: dict[int, torch.Tensor] = {}
        blocks = [self.unet.decoder.blocks[-(k + 2)] for k in range(self.deep_supervision)]  # as aux_heads
        hooks = [block.register_forward_hook(lambda _m, _i, out, k=k: features.__setitem__(k, out))
                 for k, block in enumerate(blocks)]
        try:
            mask_logits, class_logits = self._unet(x)
        finally:
            for hook in hooks:
                hook.remove()
        aux_logits = [head(features[k]) for k, head in enumerate(self.aux_heads)]
        return mask_logits, class_logits, aux_logits

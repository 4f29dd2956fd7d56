"""TinyViT image encoder for MobileSAM and LiteMedSAM, built from timm's maintained ``TinyVit``.

MobileSAM (https://arxiv.org/abs/2306.14289) and LiteMedSAM distil SAM's ViT-H image encoder into
TinyViT-5M (https://arxiv.org/abs/2207.10666). Their encoder is timm's ``tiny_vit_5m_224`` with three
changes, which this module applies to a timm model instead of carrying a copy of the network:

1. the last stage does not downsample (its ``PatchMerging`` depthwise conv has stride 1), so the
   output stride is 16 and a 1024 px image gives the 64x64 grid SAM's decoder expects;
2. a SAM "neck" (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) maps the 320 channels to 256;
3. LiteMedSAM only: the two stem convs are 1x1 with stride 1, so its 256 px input also gives 64x64.

Checkpoints in the official layout (``image_encoder.layers.N...``, ``Conv2d_BN`` named ``c``/``bn``,
downsampling at the *end* of a stage) are renamed onto timm's layout (``stages.N``, ``conv``/``bn``,
downsampling at the *start* of the next stage) by :func:`tinyvit_keys_from_official`; the
tensors themselves are unchanged, and :func:`tinyvit_keys_to_official` maps them back for export.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import timm
import torch
from segment_anything.modeling.common import LayerNorm2d
from timm.models.tiny_vit import ConvNorm
from torch import nn

# The official checkpoints carry TinyViT's unused ImageNet classifier (MobileSAM only); SAM never calls it.
_OFFICIAL_UNUSED = re.compile(r"^image_encoder\.(norm_head|head)\.")


class TinyViTEncoder(nn.Module):
    """timm TinyViT trunk plus SAM's neck: the image encoder of MobileSAM / LiteMedSAM.

    Args:
        img_size: Side of the square, padded input (1024 for MobileSAM, 256 for LiteMedSAM).
        embed_dims: Channels of the four stages.
        depths: Blocks per stage.
        num_heads: Attention heads per stage (stage 0 is convolutional and ignores its entry).
        window_sizes: Local attention window per stage.
        stem_stride: 4 = TinyViT's two 3x3 stride-2 convs (MobileSAM); 1 = two 1x1 convs (LiteMedSAM).
        out_chans: Channels of the output embedding (SAM's prompt dimension).

    Shapes:
        input ``[B, 3, img_size, img_size]`` -> output ``[B, out_chans, img_size / (4 * stem_stride), ...]``
        (64x64 for both MobileSAM at 1024 px and LiteMedSAM at 256 px).

    Example:
        >>> enc = TinyViTEncoder(img_size=128, embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1),
        ...                      num_heads=(1, 2, 3, 4), window_sizes=(7, 7, 7, 7), out_chans=32)
        >>> enc(torch.zeros(1, 3, 128, 128)).shape
        torch.Size([1, 32, 8, 8])
    """

    def __init__(
        self,
        img_size: int,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        stem_stride: int = 4,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        if stem_stride not in (1, 4):
            raise ValueError(f"stem_stride must be 4 (MobileSAM) or 1 (LiteMedSAM), got {stem_stride}")
        self.img_size = img_size  # segment_anything's Sam.preprocess/postprocess_masks and SamPredictor read it
        self.trunk = timm.create_model(
            "tiny_vit_5m_224", pretrained=False, num_classes=0, drop_path_rate=0.0,
            embed_dims=tuple(embed_dims), depths=tuple(depths), num_heads=tuple(num_heads),
            window_sizes=tuple(window_sizes))
        # SAM reads the stride-16 feature map; the pooled ImageNet head (norm + fc) has no place in it.
        self.trunk.head = nn.Identity()
        if stem_stride == 1:
            half = embed_dims[0] // 2
            self.trunk.patch_embed.conv1 = ConvNorm(3, half, ks=1, stride=1, pad=0)
            self.trunk.patch_embed.conv2 = ConvNorm(half, embed_dims[0], ks=1, stride=1, pad=0)
            self.trunk.patch_embed.stride = 1
        # MobileSAM keeps the last stage at the previous resolution (stride 16 overall, not 32).
        self.trunk.stages[-1].downsample.conv2.conv.stride = (1, 1)
        reduction = self.trunk.patch_embed.stride
        for i, info in enumerate(self.trunk.feature_info):  # keep timm's metadata truthful for feature users
            reduction *= 2 if 0 < i < len(embed_dims) - 1 else 1
            info["reduction"] = reduction
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.embed_size = img_size // self.trunk.feature_info[-1]["reduction"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised, padded images -> ``[B, out_chans, S/16, S/16]`` (S/4 for LiteMedSAM)."""
        return self.neck(self.trunk.forward_features(x))


def _official_to_timm(key: str) -> str | None:
    """One official MobileSAM/LiteMedSAM encoder key -> our key; None for keys SAM does not use."""
    if _OFFICIAL_UNUSED.match(key):
        return None
    if key.startswith("image_encoder.patch_embed.seq."):
        key = re.sub(r"seq\.0\.", "conv1.", re.sub(r"seq\.2\.", "conv2.", key))
        key = key.replace("image_encoder.", "image_encoder.trunk.", 1)
    elif m := re.match(r"image_encoder\.layers\.(\d+)\.downsample\.(.*)", key):
        # Official: downsample ends stage i; timm: it opens stage i + 1.
        key = f"image_encoder.trunk.stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    elif key.startswith("image_encoder.layers."):
        key = key.replace("image_encoder.layers.", "image_encoder.trunk.stages.", 1)
    else:
        return key
    return re.sub(r"\.c\.weight$", ".conv.weight", key)  # Conv2d_BN names its conv "c", timm's ConvNorm "conv"


def tinyvit_keys_from_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official MobileSAM/LiteMedSAM state dict onto :class:`TinyViTEncoder` keys.

    Keys already in our layout and the prompt encoder / mask decoder pass through unchanged; the
    TinyViT ImageNet head that MobileSAM's checkpoint carries (``norm_head``, ``head``) is dropped.

    Args:
        state_dict: Full SAM state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).

    Returns:
        A new dict with the same tensors under our names.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = _official_to_timm(key)
        if new is not None:
            out[new] = value
    return out


def tinyvit_keys_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`tinyvit_keys_from_official`: our keys -> the layout MobileSAM's own code loads.

    Example:
        >>> torch.save(tinyvit_keys_to_official(sam.state_dict()), "mobile_sam_finetuned.pt")  # doctest: +SKIP
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("image_encoder.trunk."):
            key = re.sub(r"\.conv\.weight$", ".c.weight", key)
            if m := re.match(r"image_encoder\.trunk\.stages\.(\d+)\.downsample\.(.*)", key):
                key = f"image_encoder.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
            elif key.startswith("image_encoder.trunk.patch_embed."):
                key = key.replace("conv1.", "seq.0.").replace("conv2.", "seq.2.").replace(".trunk.", ".", 1)
            else:
                key = key.replace("image_encoder.trunk.stages.", "image_encoder.layers.", 1)
        out[key] = value
    return out

"""Semantic segmentation on a backbone's patch-token maps, as a LightningModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from vfmtune.adapt.backbone import adapted_backbone
from vfmtune.backbones import create_backbone, data_config, patch_tokens, resolve_model_name
from vfmtune.choices import SegHead
from vfmtune.compose import to_container, typed
from vfmtune.config import Config
from vfmtune.metrics import MaskMetrics
from vfmtune.seg_losses import build_seg_loss
from vfmtune.tasks.adapted import AdaptedModule
from vfmtune.tasks.seg_heads import EncoderStem, LightDecoder, LinearHead, SkipDecoder, build_seg_head, default_layers
from vfmtune.tiling import sliding_window
from vfmtune.weights import WeightsError, packaged_weights


def encode(backbone: nn.Module, images: torch.Tensor, layers: int) -> torch.Tensor:
    """The last `layers` blocks' feature maps, resized to the finest and concatenated: `[B, C_total, h, w]`
    (for a ViT every block has the same `h x w = H / patch`; a CNN's deeper maps are upsampled)."""
    maps = patch_tokens(backbone, images, layers)
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
    return torch.cat(maps, 1)


def skip_stem(config: Config, dcfg: dict[str, Any], load_weights: bool) -> EncoderStem | None:
    """`segment.skip_encoder`'s first two levels for `decoder_skip`, with its ImageNet weights (packaged where
    vfmtune packages them, else the hub) unless a state dict follows (None: no skip encoder configured)."""
    name = config.segment.skip_encoder
    if name is None or config.segment.head != SegHead.decoder_skip:
        return None
    weights = "none"
    if load_weights:
        try:
            packaged_weights(resolve_model_name(name).removeprefix("timm/"))
            weights = "packaged"
        except WeightsError:  # online users: timm's hub weights (offline: create_backbone fails fast, naming the fix)
            weights = "hub"
    try:
        cnn = create_backbone(name, weights=weights)
    except WeightsError as e:
        raise WeightsError(f"segment.skip_encoder={name}: no packaged weights (packaged: timm/tf_efficientnet_lite0), "
                           f"so its ImageNet weights come from the hub:\n{e}") from e
    return EncoderStem(cnn, tuple(dcfg["mean"]), tuple(dcfg["std"]))


class Segmenter(AdaptedModule):
    """Backbone + segmentation head: images `[B, 3, S, S]` -> logits `[B, K, S, S]`.

    Args:
        config: the run's config (`segment` section: head, layers, loss, window).
        classes: class names, index = mask value.
        load_weights: build the backbone with its configured weights (False: a state dict follows).
        class_pixels: labelled pixels per class in the training split (class-weighted losses).
        window: source pixels per model input (the training images' median size) for tiled inference.

    Example:
        >>> model = Segmenter(typed({"task": "segment", "backbone": {"name": "timm/test_vit", "weights": "none",
        ...                          "img_size": 64}}), ["background", "nucleus"])
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 2, 64, 64])
    """

    def __init__(
        self,
        config: Config | dict[str, Any],
        classes: Sequence[str],
        load_weights: bool = True,
        class_pixels: Sequence[int] | None = None,
        window: int | None = None,
    ) -> None:
        super().__init__()
        config = typed(config, Config)
        pixels = None if class_pixels is None else [int(n) for n in class_pixels]
        self.save_hyperparameters({"task": "segment", "config": to_container(config), "classes": list(classes),
                                   "class_pixels": pixels, "window": window})
        self.config, self.window = config, window
        seg = config.segment
        self.backbone = adapted_backbone(config, load_weights)
        self.layers = default_layers(seg.head, seg.layers)
        self.data_cfg = dcfg = data_config(self.backbone, config.backbone.img_size)
        self.size, self.interpolation = int(dcfg["input_size"][-1]), str(dcfg.get("interpolation", "bilinear"))
        was_training = self.backbone.training
        with torch.no_grad():
            channels = encode(self.backbone.eval(), torch.zeros(1, 3, self.size, self.size), self.layers).shape[1]
        self.backbone.train(was_training)
        self.head = build_seg_head(seg.head, channels, len(classes), seg.decoder_dim, skip_stem(config, self.data_cfg, load_weights))
        self.reads_image = getattr(self.head, "reads_image", False)
        self.loss_fn = build_seg_loss(seg, pixels)
        # True when batches hold cached token maps [B, C, h, w] instead of images [B, 3, S, S].
        self.tokens_input = False
        self.init_eval(MaskMetrics(), classes)

    @override
    def feature_norms(self) -> list[nn.Module]:
        # Only the norm on backbone features: the decoder's inner norms see its own, moving, activations.
        if isinstance(self.head, LinearHead):
            return [self.head.norm]
        return [self.head.project[0]] if isinstance(self.head, LightDecoder | SkipDecoder) else []

    @property
    @override
    def cached_input(self) -> bool:
        return self.tokens_input

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[B, 3, S, S]` -> the head's input `[B, C, h, w]` (what the patch-token cache stores)."""
        return encode(self.backbone, images, self.layers)

    def low_res(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[B, 3, S, S]` -> logits at the head's resolution `[B, K, h, w]` (what tiles and exports run;
        `h = S / patch`, or `S / 2` for a head that reads the image)."""
        tokens = self.encode(images)
        return self.head(tokens, images) if self.reads_image else self.head(tokens)

    def logits(self, inputs: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Logits `[B, K, *size]` of images or (with `tokens_input`) of cached token maps."""
        low = self.head(inputs) if self.tokens_input else self.low_res(inputs)
        return F.interpolate(low, size=tuple(size), mode="bilinear", align_corners=False)

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[B, 3, S, S]` -> logits `[B, K, S, S]` (the exported graph)."""
        return F.interpolate(self.low_res(images), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def predict_image(self, image: torch.Tensor) -> torch.Tensor:
        """A normalised image `[1, 3, H, W]` at its own size -> logits `[1, K, H, W]`: resized whole when
        it is about the training size, else tiled in overlapping windows (`vfmtune.tiling`)."""
        window = self.config.segment.window or self.window or max(image.shape[-2:])
        return sliding_window(self.low_res, image, self.size, int(window), self.config.segment.overlap, mode=self.interpolation)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.logits(x, y.shape[-2:]), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    @override
    def eval_outputs(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self.logits(x, y.shape[-2:])
        return logits, y, self.loss_fn(logits, y)


class LowResLogits(nn.Module):
    """Export view of a trained segmenter (or student): images `[B, 3, S, S]` -> logits at the model's own
    resolution `[B, K, h, w]`. The consumer resizes them once, to the image or window they cover, as
    `vfmtune.tiling` does, so an exported model and the trained one blend identical logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.low_res(images)


class TiledSegmenter(nn.Module):
    """Evaluation view of a trained segmenter: native-size images `[1, 3, H, W]` -> logits `[1, K, H, W]`."""

    def __init__(self, model: Segmenter) -> None:
        super().__init__()
        self.model = model

    @override
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.predict_image(image)

"""SAM image embeddings computed once: the encoder's input transform, its precision, and the cache.

A frozen SAM encoder (1.5 s per image for MobileSAM at 1024 px on two cores) dominates a decoder
fine-tune, so its embeddings go through vfmtune's embedding cache (:mod:`vfmtune.embedding_cache`):
content-addressed per image, keyed by the encoder's actual weights, this transform (size, resize,
normalisation) and the precision. :class:`SamImageTransform` builds exactly the tensor that
segment-anything's ``SamPredictor.set_image`` feeds the encoder, so a cached embedding and a live one
are the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from vfmtune.config import Config
from vfmtune.sam.models import MinMaxSam


class SamImageTransform:
    """An RGB image -> the encoder input ``[3, S, S]``: SamPredictor's resize (longest side to ``S``,
    bilinear on the PIL image), then the model's own ``preprocess`` (normalise, zero-pad).

    Args:
        sam: The model whose ``preprocess`` (SAM's pixel mean/std, or LiteMedSAM's min-max) is used.

    Example:
        >>> tf = SamImageTransform(build_sam("test_sam_tinyvit"))
        >>> tf(Image.new("RGB", (90, 60))).shape
        torch.Size([3, 128, 128])
    """

    def __init__(self, sam: Sam) -> None:
        self.size = int(sam.image_encoder.img_size)
        self.resize = ResizeLongestSide(self.size)
        self.preprocess = sam.preprocess
        mean, std = sam.pixel_mean.flatten().tolist(), sam.pixel_std.flatten().tolist()
        self.normalise = "min-max per image" if isinstance(sam, MinMaxSam) else f"mean={mean} std={std}"

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of an image of ``(height, width)`` after the resize, before padding."""
        return self.resize.get_preprocess_shape(height, width, self.size)

    @torch.no_grad()
    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
        x = torch.as_tensor(self.resize.apply_image(rgb)).permute(2, 0, 1)[None]
        return self.preprocess(x)[0].float()

    def __repr__(self) -> str:  # part of the embedding cache key: every parameter that changes the input
        return f"SamImageTransform(size={self.size}, resize=longest side bilinear (PIL), normalise={self.normalise}, pad=zeros)"


def sam_precision(config: Config) -> str:
    """``"bf16"`` when the run's ``trainer.precision`` is a bf16 one, else ``"fp32"``: SAM's forwards outside
    the Trainer (embedding cache, evaluation, auto-mask) follow the Trainer's arithmetic, so one setting
    decides both (bench/sam_latency.py: bf16 autocast 1.75x faster, quokka IoU 0.9585 -> 0.9582)."""
    return "bf16" if str(config.trainer.get("precision") or "").startswith("bf16") else "fp32"


def sam_autocast(config: Config) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in bf16 on the CPU when :func:`sam_precision` says so, else a no-op."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if sam_precision(config) == "bf16" else contextlib.nullcontext()


def sam_embeddings(config: Config, sam: Sam, paths: Sequence[str]) -> torch.Tensor:
    """Image embeddings ``[len(paths), C, g, g]`` of a frozen encoder through the run's embedding cache.

    The key holds ``sam:<model>``, a digest of the encoder's weights, :class:`SamImageTransform`'s repr
    and the precision, so another model, fine-tuned encoder weights or bf16 never reuse these features.
    """
    from vfmtune.embedding_cache import embed_images  # not at import time: keeps vfmtune.sam light

    autocast = sam_autocast(config)

    def encode(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with autocast:
            return encoder(x)

    keyed = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, name=f"sam:{config.sam.model}"))
    return embed_images(keyed, sam.image_encoder, paths, extract=encode, kind=f"sam_embedding:{sam_precision(config)}",
                        label="SAM image embeddings", transform=SamImageTransform(sam))

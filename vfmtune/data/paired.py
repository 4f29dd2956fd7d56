"""Paired image/mask transforms and the segmentation dataset.

Geometry must hit image and mask identically, and the mask must only ever be *moved*, never
blended: a bilinear resize turns an edge between classes 1 and 3 into a 2 and the ignore border
(255) into 127s. torchvision.transforms.v2 gives both for free: one call transforms every
``tv_tensors`` input with the same random parameters, and masks (``tv_tensors.Mask``) always
resample with nearest neighbour and are skipped by photometric ops and normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from vfmtune.choices import ConfigError
from vfmtune.config import AugmentConfig
from vfmtune.data.images import load_image
from vfmtune.data.masks import ColourTable, load_mask

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class PairedTransform:
    """Apply one ``v2`` pipeline to an image and its mask with the same random draws.

    Args:
        transform: A ``torchvision.transforms.v2`` transform over ``(Image, Mask)``.

    Example:
        >>> tf = PairedTransform(v2.Compose([v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]))
        >>> image, mask = tf(Image.new("RGB", (8, 6)), np.zeros((6, 8), np.uint8))
        >>> image.shape, mask.shape, mask.dtype
        (torch.Size([3, 6, 8]), torch.Size([6, 8]), torch.int64)
    """

    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image | np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(RGB image [H, W, 3] or PIL, ids [H, W] uint8)`` -> ``(float [3, h, w], long [h, w])``."""
        pixels = np.array(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
        if pixels.shape[:2] != mask.shape:
            raise ValueError(f"image {pixels.shape[1]}x{pixels.shape[0]} and mask {mask.shape[1]}x{mask.shape[0]} "
                             "differ in size; load_mask(..., image_size=image.size) checks this with the file names")
        img = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))
        ids = tv_tensors.Mask(torch.from_numpy(np.array(mask, dtype=np.uint8)))  # a writable copy
        out_img, out_ids = self.transform(img, ids)
        return out_img.as_subclass(torch.Tensor), out_ids.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


def _augment_dict(augment: AugmentConfig | dict[str, Any] | None) -> dict[str, Any]:
    if augment is None:
        return {"enabled": False}
    return dict(augment.__dict__ if isinstance(augment, AugmentConfig) else augment)


def build_paired_transforms(
    data_config: dict[str, Any], augment: AugmentConfig | dict[str, Any] | None = None, *, eval_resize: bool = True,
) -> tuple[PairedTransform, PairedTransform]:
    """Return ``(train_transform, eval_transform)`` for segmentation, each ``(image, mask) -> tensors``.

    Training: ``RandomResizedCrop`` to the input size (area range ``augment.scale``; the image
    with ``data_config["interpolation"]``, the mask with nearest neighbour), horizontal/vertical
    flips with ``augment.hflip``/``augment.vflip``, colour jitter on the image only. Eval: resize
    to the input size, or keep the size with ``eval_resize=False``. Both normalise the image.

    Args:
        data_config: timm data config: ``input_size`` ``(3, H, W)``, ``mean``, ``std``, ``interpolation``.
        augment: Training augmentation (the same :class:`vfmtune.config.AugmentConfig` as classification);
            ``None`` or ``enabled=False`` trains on plain resized images.
        eval_resize: Resize eval images to the input size (batchable), else keep their own size.

    Returns:
        Transforms giving image ``float32 [3, H, W]`` normalised and mask ``int64 [H, W]`` whose
        values are only ids present in the input mask (255 = ignore preserved).

    Raises:
        ConfigError: For ``augment.auto_augment``: RandAugment/AutoAugment in torchvision apply
            their geometric ops to the image only, which would misalign the mask.

    Example:
        >>> train_tf, eval_tf = build_paired_transforms({"input_size": (3, 224, 224)}, AugmentConfig())
        >>> image, mask = train_tf(Image.new("RGB", (320, 240)), np.zeros((240, 320), np.uint8))
        >>> image.shape, mask.shape
        (torch.Size([3, 224, 224]), torch.Size([224, 224]))
    """
    size = tuple(int(v) for v in data_config["input_size"][-2:])
    interpolation = v2.InterpolationMode(str(data_config.get("interpolation", "bilinear")))
    tail = [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(list(data_config.get("mean", _IMAGENET_MEAN)), list(data_config.get("std", _IMAGENET_STD)))]
    resize = v2.Resize(size, interpolation=interpolation, antialias=True)
    eval_tf = PairedTransform(v2.Compose([resize, *tail] if eval_resize else tail))
    aug = _augment_dict(augment)
    if not aug.get("enabled", True):
        return PairedTransform(v2.Compose([resize, *tail])), eval_tf
    if aug.get("auto_augment"):
        raise ConfigError(f"data.augment.auto_augment={aug['auto_augment']!r} is not mask-aware (its rotations and "
                          "shears would move the image but not the mask). Fix: set data.augment.auto_augment=null "
                          "for segmentation")
    ops: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=tuple(aug.get("scale", (0.6, 1.0))),
                                                    interpolation=interpolation, antialias=True)]
    if aug.get("hflip", 0.0) > 0:
        ops.append(v2.RandomHorizontalFlip(p=aug["hflip"]))
    if aug.get("vflip", 0.0) > 0:
        ops.append(v2.RandomVerticalFlip(p=aug["vflip"]))
    if aug.get("color_jitter"):
        jitter = float(aug["color_jitter"])
        ops.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))  # as timm: no hue
    return PairedTransform(v2.Compose([*ops, *tail])), eval_tf


def image_transform(data_config: dict[str, Any], size: int | None = None) -> v2.Compose:
    """The image half of the eval transform, for a PIL image: resized to the input size (or to `size` x
    `size`) and normalised: the same pixels `build_paired_transforms`' eval transform gives the image,
    so a patch-token cache built with it matches the uncached path.
    """
    target = (int(size), int(size)) if size else tuple(int(v) for v in data_config["input_size"][-2:])
    interpolation = v2.InterpolationMode(str(data_config.get("interpolation", "bilinear")))
    return v2.Compose([v2.ToImage(), v2.Resize(target, interpolation=interpolation, antialias=True),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(data_config.get("mean", _IMAGENET_MEAN)), list(data_config.get("std", _IMAGENET_STD)))])


def normalise_transform(data_config: dict[str, Any]) -> v2.Compose:
    """A PIL image at its own size -> normalised float `[3, H, W]` (tiled inference resizes windows itself)."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(data_config.get("mean", _IMAGENET_MEAN)), list(data_config.get("std", _IMAGENET_STD)))])


class SegmentationDataset(Dataset):
    """``(image, mask)`` pairs; decoding goes through :func:`load_image` and :func:`load_mask`, so a
    file that broke after the scan fails with its path and a fix, not a traceback inside a worker.

    Args:
        paths: Image files.
        masks: Mask files, paired by position.
        transform: A :class:`PairedTransform` (e.g. from :func:`build_paired_transforms`).
        num_classes: Valid ids are ``0..num_classes-1`` and 255.
        colours: ``{(r, g, b): class id}`` for colour masks.

    Example:
        >>> ds = SegmentationDataset(table.paths, table.masks, eval_tf, num_classes=3)  # doctest: +SKIP
        >>> image, mask = ds[0]  # float [3, H, W], long [H, W]
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], masks: Sequence[str | os.PathLike[str]],
                 transform: PairedTransform, *, num_classes: int | None = None,
                 colours: ColourTable | None = None) -> None:
        if len(paths) != len(masks):
            raise ValueError(f"{len(paths)} images but {len(masks)} masks; pairs are matched by position")
        self.paths = [os.fspath(p) for p in paths]
        self.masks = [os.fspath(m) for m in masks]
        self.transform = transform
        self.num_classes = num_classes
        self.colours = colours

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_image(self.paths[i])
        mask = load_mask(self.masks[i], num_classes=self.num_classes, colours=self.colours,
                         image_size=image.size, image_path=self.paths[i])
        return self.transform(image, mask)

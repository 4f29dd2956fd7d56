"""Batches of prompted SAM training and evaluation: one image (or its cached embedding) with all its instances.

Images hold different numbers of instances, so a batch is an :class:`SamBatch` (the stacked encoder inputs
plus each image's ground-truth boxes and sizes) and a :class:`Targets` list (each image's instance masks
and classes). Both move between devices with ``.to(device)``, which Lightning and
:func:`vfmtune.inference.score` call on any batch object that has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from vfmtune.data.datamodule import SplitData
from vfmtune.data.images import load_image
from vfmtune.data.instances import load_instances
from vfmtune.data.masks import oriented_size
from vfmtune.sam.embeddings import SamImageTransform
from vfmtune.sam.prompts import boxes_from_masks


@dataclass
class InstanceTarget:
    """The instances of one image.

    Attributes:
        masks: ``[N, H, W]`` bool at the image's size.
        labels: ``[N]`` class ids (1..K-1).
        low_res: ``[N, L, L]`` float in [0, 1]: the masks on the decoder's low-resolution grid (training only).
    """

    masks: torch.Tensor
    labels: torch.Tensor
    low_res: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> InstanceTarget:
        return InstanceTarget(self.masks.to(device), self.labels.to(device), None if self.low_res is None else self.low_res.to(device))


class Targets(list):
    """Per-image :class:`InstanceTarget` of a batch."""

    def to(self, device: torch.device | str) -> Targets:
        return Targets(t.to(device) for t in self)


@dataclass
class SamBatch:
    """Encoder inputs of a batch and what prompting needs per image.

    Attributes:
        inputs: ``[B, 3, S, S]`` preprocessed images, or ``[B, C, g, g]`` cached embeddings.
        boxes: Per image ``[N, 4]`` x0, y0, x1, y1 ground-truth boxes in original-image pixels.
        original_sizes: Per image ``(H, W)``.
        input_sizes: Per image ``(h, w)`` after the encoder's resize (before padding).
    """

    inputs: torch.Tensor
    boxes: list[torch.Tensor]
    original_sizes: list[tuple[int, int]]
    input_sizes: list[tuple[int, int]]

    def to(self, device: torch.device | str) -> SamBatch:
        return SamBatch(self.inputs.to(device), [b.to(device) for b in self.boxes], self.original_sizes, self.input_sizes)

    def __len__(self) -> int:
        return len(self.inputs)


def low_res_targets(masks: torch.Tensor, input_size: tuple[int, int], encoder_size: int, low_res: int) -> torch.Tensor:
    """``[N, H, W]`` bool -> ``[N, L, L]``: resized as the image is (longest side to the encoder size), then onto
    the decoder's ``L x L`` grid, zero where the encoder input is padding (antialiased: soft at edges)."""
    h, w = (max(1, round(s * low_res / encoder_size)) for s in input_size)
    out = torch.zeros(len(masks), low_res, low_res)
    if len(masks):
        out[:, :h, :w] = F.interpolate(masks[:, None].float(), size=(h, w), mode="bilinear", antialias=True,
                                       align_corners=False)[:, 0]
    return out


class InstanceImages(Dataset):
    """``(SamBatch-item, InstanceTarget)`` per image: the encoder input (or cached embedding) and its instances.

    Args:
        paths: Image files.
        refs: Instance references (:func:`vfmtune.data.instances.load_instances`), one per image.
        transform: The model's :class:`SamImageTransform`.
        embeddings: ``[N, C, g, g]`` cached embeddings of ``paths``, or None to feed images.
        low_res: The decoder's mask side L, to build training targets (None: evaluation, no low-res targets).
        num_classes: K, for checking class ids.
        min_area: Instances with fewer pixels are left out.
    """

    def __init__(self, paths: Sequence[str], refs: Sequence[str], transform: SamImageTransform,
                 embeddings: torch.Tensor | None = None, low_res: int | None = None, num_classes: int | None = None,
                 min_area: int = 1) -> None:
        self.paths, self.refs, self.transform = list(paths), list(refs), transform
        self.embeddings, self.low_res, self.num_classes, self.min_area = embeddings, low_res, num_classes, min_area

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]], InstanceTarget]:
        # With a cached embedding only the image's size is needed: its header, not its pixels.
        image = load_image(self.paths[i]) if self.embeddings is None else None
        w, h = image.size if image is not None else oriented_size(self.paths[i])
        instances, _ = load_instances(self.refs[i], (w, h), self.num_classes, self.min_area)
        masks = torch.from_numpy(np.stack([inst.mask for inst in instances])) if instances else torch.zeros(0, h, w, dtype=torch.bool)
        labels = torch.tensor([inst.class_index for inst in instances], dtype=torch.long)
        x = self.embeddings[i] if self.embeddings is not None else self.transform(image)
        input_size = self.transform.input_size(h, w)
        low = None if self.low_res is None else low_res_targets(masks, input_size, self.transform.size, self.low_res)
        return (x, boxes_from_masks(masks), (h, w), input_size), InstanceTarget(masks, labels, low)


def collate(items: Sequence[tuple[tuple, InstanceTarget]]) -> tuple[SamBatch, Targets]:
    """Stack the encoder inputs; keep boxes, sizes and targets per image."""
    xs, boxes, sizes, input_sizes = zip(*(item[0] for item in items))
    return SamBatch(torch.stack(xs), list(boxes), list(sizes), list(input_sizes)), Targets(item[1] for item in items)


def instance_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, shuffle: bool = False) -> DataLoader:
    """A DataLoader of :class:`InstanceImages` batches."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collate)


class InstanceData(SplitData):
    """`SplitData` whose loaders collate with :func:`collate` (per-image instance lists)."""

    @override
    def _loader(self, split: str, train: bool = False) -> DataLoader:
        batch = self.batch_size if train or self.eval_batch_size is None else self.eval_batch_size
        return instance_loader(self.datasets[split], batch, self.num_workers, shuffle=train)

"""Pure array helpers for building segmentation datasets: scaling, tiling, targets, COCO RLE, stats.

No file or network access here, so ``tests/test_seg_data.py`` checks every function on generated
arrays; ``bench/seg_data.py`` feeds them the real images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

IGNORE = 255  # mask value for pixels without a label


@dataclass
class Sample:
    """One image with its targets.

    Attributes:
        stem: File stem shared by the image, mask and instance map.
        image: ``(H, W)`` or ``(H, W, 3)`` uint8.
        mask: ``(H, W)`` uint8 class indices, :data:`IGNORE` = not labelled.
        instances: ``(H, W)`` uint16 instance ids, 0 = none; None for semantic-only data.
        instance_info: Instance id -> COCO fields (``category_id``, ``truncated``, ...).
    """

    stem: str
    image: NDArray[np.uint8]
    mask: NDArray[np.uint8]
    instances: NDArray[np.uint16] | None = None
    instance_info: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class SegDataset:
    """A named dataset ready to write: class names, samples and the caveats that travel with it."""

    name: str
    classes: list[str]
    samples: list[Sample]
    notes: list[str] = field(default_factory=list)


def percentile_to_uint8(image: NDArray[Any], low: float, high: float,
                        valid: NDArray[np.bool_] | None = None) -> NDArray[np.uint8]:
    """Map ``image`` to uint8 so that its ``low``/``high`` percentiles become 0/255 (clipped outside).

    Percentiles are taken over the whole source image (or its ``valid`` pixels) before tiling, so
    every tile shares one intensity mapping; a per-tile stretch would make an empty tile's noise
    look like signal. Invalid pixels become 0.

    Example:
        >>> percentile_to_uint8(np.arange(101), 0, 100)[[0, 50, 100]].tolist()
        [0, 128, 255]
    """
    values = image[valid] if valid is not None else image.ravel()
    lo, hi = np.percentile(values, [low, high]) if values.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    scaled = np.rint((image.astype(np.float64) - lo) / (hi - lo) * 255.0)
    out = np.clip(scaled, 0, 255).astype(np.uint8)
    if valid is not None:
        out[~valid] = 0
    return out


def tile_slices(shape: tuple[int, int], tile: int) -> list[tuple[int, int, slice, slice]]:
    """Non-overlapping ``tile``x``tile`` windows, row-major, as ``(row, col, ys, xs)``.

    No overlap, so a tile-level train/test split never shares a pixel; a remainder narrower than a
    tile is dropped (every source here divides exactly).
    """
    rows, cols = shape[0] // tile, shape[1] // tile
    if rows == 0 or cols == 0:
        raise ValueError(f"tile {tile} is larger than the image {shape}")
    return [(r, c, slice(r * tile, (r + 1) * tile), slice(c * tile, (c + 1) * tile))
            for r in range(rows) for c in range(cols)]


def boundary_target(instances: NDArray[np.integer], width: int = 2) -> NDArray[np.uint8]:
    """3-class target from an instance map: 0 background, 1 interior, 2 boundary.

    A foreground pixel is boundary when a pixel within ``width`` (square neighbourhood) has another
    label, background or a touching instance: the boundary lies inside each object, so touching
    nuclei end up separated by a ``2 * width`` band. Pixels past the image border count as the same
    label (``mode="nearest"``): an object cut by the field of view has no known edge there. Compute
    it on the full image before tiling for the same reason.
    """
    from scipy import ndimage

    size = 2 * width + 1
    hi = ndimage.maximum_filter(instances, size=size, mode="nearest")
    lo = ndimage.minimum_filter(instances, size=size, mode="nearest")
    foreground = instances > 0
    target = foreground.astype(np.uint8)
    target[foreground & ((hi != instances) | (lo != instances))] = 2
    return target


def crop_instances(instances: NDArray[np.integer], ys: slice, xs: slice,
                   categories: Mapping[int, int]) -> tuple[NDArray[np.uint16], dict[int, dict[str, Any]]]:
    """Crop an instance map and renumber the ids 1..n within the crop.

    Returns:
        The ``(h, w)`` uint16 crop and, per new id, its ``category_id``, the ``source_instance_id``
        and ``truncated`` (the instance has pixels outside the crop, so its box is partial).
    """
    full_area = np.bincount(instances.ravel())
    crop = instances[ys, xs]
    ids, area = np.unique(crop, return_counts=True)
    out = np.zeros(crop.shape, np.uint16)
    info: dict[int, dict[str, Any]] = {}
    for new, (old, n) in enumerate(((i, a) for i, a in zip(ids, area, strict=True) if i != 0), start=1):
        out[crop == old] = new
        info[new] = {"category_id": int(categories[int(old)]), "source_instance_id": int(old),
                     "truncated": bool(n < full_area[old])}
    return out, info


def encode_instances(instances: NDArray[np.integer], info: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """COCO annotations (without ``id``/``image_id``) for every instance id > 0, segmentation as RLE."""
    from pycocotools import mask as mask_utils

    anns = []
    for iid in np.unique(instances):
        if iid == 0:
            continue
        rle = mask_utils.encode(np.asfortranarray(instances == iid, dtype=np.uint8))
        anns.append({
            **info.get(int(iid), {}),
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],  # x, y, w, h
            "iscrowd": 0,
            "instance_id": int(iid),  # the value in instances/<stem>.png
        })
    return anns


def coco_dataset(samples: list[Sample], classes: list[str]) -> dict[str, Any]:
    """COCO instances JSON for ``samples``; category ids are class indices (background excluded)."""
    images, annotations = [], []
    for image_id, s in enumerate(samples, start=1):
        h, w = s.mask.shape
        images.append({"id": image_id, "file_name": f"images/{s.stem}.png", "height": h, "width": w})
        assert s.instances is not None
        for ann in encode_instances(s.instances, s.instance_info):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    categories = [{"id": i, "name": n} for i, n in enumerate(classes) if i > 0]
    return {"images": images, "annotations": annotations, "categories": categories}


def polygon_mask(shape: tuple[int, int], polygons: list[list[tuple[float, float]]]) -> NDArray[np.bool_]:
    """Fill pixel-coordinate ``(x, y)`` polygons into an ``(H, W)`` boolean mask (edges included)."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        draw.polygon(poly, fill=1)
    return np.asarray(canvas, dtype=bool)


def iou(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def dataset_stats(ds: SegDataset) -> dict[str, Any]:
    """Counts, sizes, class pixel fractions (of labelled pixels) and instances per image."""
    counts = np.zeros(len(ds.classes), np.int64)
    ignored = total = 0
    for s in ds.samples:
        counts += np.bincount(s.mask.ravel(), minlength=256)[: len(ds.classes)]
        ignored += int((s.mask == IGNORE).sum())
        total += s.mask.size
    labelled = max(int(counts.sum()), 1)
    stats: dict[str, Any] = {
        "n_images": len(ds.samples),
        "sizes": sorted({"x".join(map(str, s.mask.shape)) for s in ds.samples}),
        "class_fraction": {c: round(float(n) / labelled, 4) for c, n in zip(ds.classes, counts, strict=True) if n},
        "ignore_fraction": round(ignored / max(total, 1), 4),
        "images_without_foreground": sum(int(not (s.mask[s.mask != IGNORE] > 0).any()) for s in ds.samples),
    }
    if ds.samples and ds.samples[0].instances is not None:
        per = [len(s.instance_info) for s in ds.samples]
        stats["instances"] = {"total": sum(per), "per_image_mean": round(float(np.mean(per)), 2),
                              "per_image_min": min(per), "per_image_max": max(per),
                              "truncated": sum(i.get("truncated", False) for s in ds.samples
                                               for i in s.instance_info.values())}
    return stats
